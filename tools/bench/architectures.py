"""Memory prediction against MemTracker for every architecture adapter, baseline and each plugin.

    python tools/bench/architectures.py [--layers 4] [--hidden 128] [--seq-len 128] [--batch-size 4]
        [--plugins loram] [--types llama,gemma2]

Each cell: predicted / measured saved activations (MemTracker headline, fp32, one probe step
of a random model built by the architecture's builder); parameters, gradients and optimizer
state are compared to the byte ("exact" or the difference). "refused" means the plugin
refuses the architecture by name at validation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine  # noqa: E402

PLUGINS = {"baseline": "[]", "checkpointing": "[{use: checkpointing}]", "mesa": "[{use: mesa}]",
           "coat": "[{use: coat, with: {optimizer: false}}]", "loram": "[{use: loram, with: {ratio: 0.5, rank: 4}}]"}
TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]


def model_config(model_type: str, layers: int, hidden: int) -> str:
    heads = hidden // 16
    if model_type == "gpt2":
        return f"{{n_embd: {hidden}, n_layer: {layers}, n_head: {heads}, n_inner: {2 * hidden}, n_positions: 1024}}"
    extra = ", head_dim: 16" if model_type in ("qwen3", "gemma2") else ""
    return (f"{{hidden_size: {hidden}, num_hidden_layers: {layers}, num_attention_heads: {heads}, "
            f"num_key_value_heads: {heads // 2}, intermediate_size: {2 * hidden}{extra}}}")


def cell(folder: Path, model_type: str, plugins: str, args: argparse.Namespace) -> str:
    from memwise.errors import RecipeError
    from memwise.runner import measure_recipe

    path = folder / f"{model_type}.yaml"
    path.write_text(f"name: arch\nseed: 0\nmodel: {{builder: {model_type}, config: "
                    f"{model_config(model_type, args.layers, args.hidden)}}}\n"
                    f"data: {{builder: pystdlib, seq_len: {args.seq_len}, batch_size: {args.batch_size}, "
                    "max_documents: 60}\ntrainer: {max_steps: 2, precision: 32-true}\n"
                    f"optimizer: {{name: adamw, lr: 1.0e-3}}\nplugins: {plugins}\nreport: {{dir: {folder}/run}}\n")
    try:
        rows, report = measure_recipe(str(path), warm=False)
    except RecipeError:
        return "refused"
    predicted, measured = rows[-1][1].as_dict(), report.headline()
    off = [c for c in ("parameters", "gradients", "optimizer_state") if predicted[c] != measured[c]]
    ratio = predicted["activations"] / measured["activations"]
    return f"{ratio:.3f} ({measured['activations'] / 2**20:.2f} MiB)" + (f" {off} off" if off else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--plugins", default=",".join(PLUGINS), help="columns to measure (comma-separated)")
    parser.add_argument("--types", default=",".join(TYPES), help="architectures to measure (comma-separated)")
    args = parser.parse_args()
    columns = {name: PLUGINS[name] for name in args.plugins.split(",")}
    print(f"machine: {machine()}\n")
    print("| architecture | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.types.split(","):
            cells = [cell(Path(tmp), model_type, plugins, args) for plugins in columns.values()]
            print(f"| {model_type} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

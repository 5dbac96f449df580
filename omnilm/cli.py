"""The `omnilm` command line: thin wrappers over the library.

    omnilm demo                                  # build, save, reload and run the tiny model
    omnilm generate MODEL --image a.png "What is in the image?"
    omnilm info MODEL | --preset NAME            # architecture and parameter counts
    omnilm convert SRC DST --dtype bfloat16      # re-save a checkpoint (HF or omnilm) as omnilm/HF
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return getattr(torch, DTYPES[name]) if name else None


def _load(path: str, device: str, dtype: str | None):
    from omnilm import OmniModel

    return OmniModel.from_pretrained(path, device=device, dtype=_dtype(dtype)).eval()


def _processor_for(model, model_dir: str | Path):
    """The folder's tokenizer and image preprocessing; without preprocessor_config.json the
    vision config's own (CLIP) preprocessing."""
    from omnilm.data import ImageProcessor, Processor

    processor = Processor.from_pretrained(model_dir, model.config.image_seq_len)
    if processor.image_processor is None and model.config.vision is not None:
        processor.image_processor = ImageProcessor.from_vision_config(model.config.vision)
    return processor


def _print_stream(model, processor, messages, args) -> str:
    from omnilm.infer import stream

    batch = processor(messages)
    pieces = []
    for piece in stream(model, processor.tokenizer, batch["input_ids"], batch["pixel_values"],
                        batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                        do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-5),
                        top_k=args.top_k, top_p=args.top_p):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces)


def _user_message(question: str, images: list[str]) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images),
                                        {"type": "text", "text": question}]}


# --- commands ---------------------------------------------------------------------------------


def cmd_generate(args) -> None:
    model = _load(args.model, args.device, args.dtype)
    processor = _processor_for(model, args.model)
    _print_stream(model, processor, [_user_message(args.prompt, args.image)], args)


def cmd_info(args) -> None:
    from omnilm import OmniModel

    if args.preset:
        model = OmniModel.from_preset(args.preset, device="meta")
    elif args.model:
        model = OmniModel.from_pretrained(args.model, device="meta")
    else:
        raise SystemExit("error: give a model folder or --preset NAME")
    c = model.config
    print(f"text:   {c.text.n_layers} layers, dim {c.text.dim}, {c.text.n_heads} heads / {c.text.n_kv_heads} kv heads, "
          f"mlp {c.text.mlp_dim}, vocab {c.text.vocab_size}, rope theta {c.text.rope_theta:g}")
    if c.vision is not None:
        v = c.vision
        print(f"vision: CLIP ViT {v.n_layers} layers, dim {v.dim}, {v.image_size}px / {v.patch_size}px patches, "
              f"feature layer {c.vision_feature_layer}, {c.image_seq_len} tokens per image")
    print(f"parameters: {model.num_parameters():,}")


def cmd_convert(args) -> None:
    model = _load(args.src, "cpu", args.dtype)
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
    print(f"wrote {args.dst} ({model.num_parameters():,} parameters)")


def cmd_demo(args) -> None:
    """Until the ShapeWorld issue lands: a randomly initialised `tiny` model, end to end."""
    import torch
    from PIL import Image, ImageDraw

    from omnilm import OmniModel
    from omnilm.data import train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    print("omnilm demo: the `tiny` preset with RANDOM weights (no training yet), so its answer is gibberish.\n"
          "It shows the whole path: tokenizer, image preprocessing, CLIP ViT -> projector -> LLaMA, "
          "save/reload as a Hugging Face LLaVA folder, and streamed generation.\n")
    t0 = time.perf_counter()
    corpus = ["a red circle left of a blue square", "what colour is the circle ?", "how many shapes are there ?",
              "the green triangle is above the yellow star", "yes", "no", "two", "three"]
    tokenizer = train_tokenizer(corpus * 4, vocab_size=512)
    model = OmniModel.from_preset("tiny", text=dict(vocab_size=tokenizer.vocab_size))
    model.tokenizer = tokenizer
    model.save_pretrained(out / "model")
    model = OmniModel.from_pretrained(out / "model").eval()
    print(f"model: {model.num_parameters():,} parameters, saved to and reloaded from {out / 'model'}")

    image = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 20, 40, 50), fill="red")
    draw.rectangle((55, 25, 85, 55), fill="blue")
    image_path = out / "example.png"
    image.save(image_path)

    processor = _processor_for(model, out / "model")
    question = "What colour is the circle?"
    print(f"\nUSER: <{image_path}> {question}\nASSISTANT: ", end="")
    args.temperature, args.top_k, args.top_p = 0.0, None, None
    _print_stream(model, processor, [_user_message(question, [str(image_path)])], args)
    print(f"\ndone in {time.perf_counter() - t0:.1f}s; everything is under {out}/")


# --- parser -----------------------------------------------------------------------------------


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this much probability")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnilm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the tiny model end to end (random weights until ShapeWorld training lands)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="answer a prompt about zero or more images with a checkpoint folder")
    p.add_argument("model", help="omnilm or Hugging Face folder (LLaVA or LLaMA) with tokenizer.json")
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--image", action="append", default=[], help="image file, placed before the text; repeatable")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default float32)")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="print a model's architecture and parameter count (allocates nothing)")
    p.add_argument("model", nargs="?", help="checkpoint folder")
    p.add_argument("--preset", help="a preset name instead of a folder (see omnilm.config.PRESETS)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="load a checkpoint folder and save it again (dtype, sharding)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    from omnilm.errors import OmniInputError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OmniInputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

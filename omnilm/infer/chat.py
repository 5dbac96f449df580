"""Chatting with a model in a terminal: one streamed answer, or a multi-turn REPL (`omnilm chat`)."""

from __future__ import annotations

import sys

from omnilm.data.collate import to_device
from omnilm.data.image import load_image
from omnilm.errors import OmniInputError
from omnilm.infer.generate import Sampling, stream


def answer(model, processor, messages: list[dict], sampling: Sampling) -> str:
    """Stream the model's reply to `messages` to stdout; return it."""
    batch = to_device(processor(messages), next(model.parameters()).device)
    pieces = []
    for piece in stream(model, processor.tokenizer, batch["input_ids"], batch["pixel_values"],
                        batch["attention_mask"], pixel_values_videos=batch.get("pixel_values_videos"),
                        input_features=batch.get("input_features"), **sampling.generate_kwargs()):
        if not pieces:
            piece = piece.lstrip()  # the first token carries the space after "ASSISTANT:"
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces).strip()


def user_message(text: str, images: list[str], videos: list[str] = (), audios: list[str] = ()) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images),
                                        *({"type": "video", "video": p} for p in videos),
                                        *({"type": "audio", "audio": p} for p in audios),
                                        {"type": "text", "text": text}]}


REPL_HELP = """/image PATH   add an image to your next message
/video PATH   add a video (a file, or a folder of frames) to your next message
/audio PATH   add an audio file (wav, flac, mp3, ogg) to your next message
/reset        start over (the --image, --video and --audio files stay for the first message)
/help         this list
/quit         leave (or Ctrl-D); a message that starts with / begins with //"""

MEDIA = ("image", "video", "audio")


def chat_repl(model, processor, sampling: Sampling, images: list[str], videos: list[str] = (),
              audios: list[str] = ()) -> None:
    print("omnilm chat: type a message; /help lists the commands.")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    messages: list[dict] = []
    first = dict(zip(MEDIA, (images, videos, audios)))
    pending = {kind: list(paths) for kind, paths in first.items()}  # what goes with the next message
    check = {"image": load_image, "video": processor.read_video, "audio": processor.read_audio}
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            print(REPL_HELP)
            continue
        if command == "/reset":
            messages, pending = [], {kind: list(paths) for kind, paths in first.items()}
            print("(conversation cleared)")
            continue
        if command[1:] in MEDIA:
            kind, path = command[1:], rest.strip()
            try:
                check[kind](path)
            except OmniInputError as e:
                print(f"(error: {e}; the {kind} was not added)")
                continue
            pending[kind].append(path)
            print(f"({kind} {path} will go with your next message)")
            continue
        if line.startswith("/") and not line.startswith("//"):
            print(f"(unknown command {command}: /help lists the commands; start a message with // to send a /)")
            continue
        turn = user_message(line.removeprefix("/"), pending["image"], pending["video"], pending["audio"])
        print("assistant> ", end="", flush=True)
        try:
            reply = answer(model, processor, messages + [turn], sampling)
        except OmniInputError as e:
            print(f"\n(error: {e}; the message and its images, videos and audio were dropped)")
            pending = {kind: [] for kind in MEDIA}
            continue
        messages += [turn, {"role": "assistant", "content": reply}]
        pending = {kind: [] for kind in MEDIA}

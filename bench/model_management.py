"""Run-time model management, measured through the API on the shipped weights (in-process, the real lifespan):
unload and load again a shipped classifier, reload it from an uploaded copy of its weights, and load/unload an
untrained torchvision ResNet-18 (47 MB) several times to see where the process's resident memory ends.

    python -m bench.model_management --out docs/bench/model-management.json

Raw JSON only; the README quotes it. The data directory is a temporary one (the run changes nothing of yours)."""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import loadavg, write_json

ROOT = Path(__file__).resolve().parent.parent


def _wait(client: Any, name: str) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = client.get(f"/models/{name}").json()
        if info["status"] != "loading":
            return info
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=3, help="ResNet-18 load/unload cycles")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services.models import process_rss
    from app.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="cnn-mgmt-"))
    settings = Settings(data_dir=data, classifiers=["cifar10-resnet56", "cifar10-resnet32", "cifar10-resnet20"],
                        text_models=[], face_models=[], style_enabled=False, allow_untrained=True, warmup=True,
                        device="cpu")
    out: dict[str, Any] = {"loadavg_start": loadavg(), "settings": {"classifiers": settings.classifiers}}
    with TestClient(create_app(settings)) as c:
        while c.get("/health/ready").json()["status"] == "loading":
            time.sleep(0.05)
        out["unload_cifar10_resnet32"] = c.post("/models/cifar10-resnet32/unload").json()
        t0 = time.perf_counter()
        assert c.post("/models/cifar10-resnet32/load").status_code == 202
        info = _wait(c, "cifar10-resnet32")
        out["load_cifar10_resnet32"] = {"status": info["status"], "origin": info["origin"],
                                        "load_seconds": info["load_seconds"],
                                        "wall_seconds_until_ready": round(time.perf_counter() - t0, 3)}
        weights = (ROOT / "weights" / "cifar10-resnet20.pt").read_bytes()
        r = c.post("/models/cifar10-resnet20/reload", files={"weights": ("cifar10-resnet20.pt", weights)},
                   data={"sha256": hashlib.sha256(weights).hexdigest()})
        out["reload_cifar10_resnet20_upload"] = r.json()
        start = process_rss()
        cycles = []
        for _ in range(args.cycles):
            assert c.post("/models/resnet18/load").status_code == 202
            _wait(c, "resnet18")
            loaded = process_rss()
            freed = c.post("/models/resnet18/unload").json()["freed"]
            cycles.append({"rss_loaded": loaded, **freed})
        out["resnet18_cycles"] = {"rss_start": start, "cycles": cycles,
                                  "rss_after_minus_start_mb": [round((x["rss_after"] - start) / 2**20, 1)
                                                               for x in cycles]}
    out["loadavg_end"] = loadavg()
    write_json(args.out, out)
    print(out["resnet18_cycles"]["rss_after_minus_start_mb"], out["unload_cifar10_resnet32"]["freed"],
          out["reload_cifar10_resnet20_upload"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

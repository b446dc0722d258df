"""Container start-up costs of the Airlock image, for the appliance note:

  import   `docker run --network none <image> python3 -c "import torch, transformers"`, wall seconds
  first    `docker run --network none <image> train --config configs/default.yaml` until the first
           step's log line, wall seconds (container start + imports + data + model + one step)
  stop     `docker stop` of a training container until it has exited, against the grace period

    python bench/container_startup.py [--image airlock:cpu] [--repeats 3]

Needs the docker SDK (the tool venv has it: vendor/.tools/venv/bin/python)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import docker


def import_time(client, image) -> float:
    t0 = time.perf_counter()
    client.containers.run(image, ["-c", "import torch, transformers"], entrypoint=["python3"],
                          network_mode="none", remove=True)
    return time.perf_counter() - t0


def first_step(client, image, vols) -> tuple[float, object]:
    t0 = time.perf_counter()
    c = client.containers.run(image, ["train", "--config", "configs/default.yaml", "--train.log_interval=1",
                                      f"--name=bench-{time.time_ns()}"],
                              detach=True, network_mode="none", init=True, volumes=vols)
    for chunk in c.logs(stream=True, follow=True):
        if b"step 1/" in chunk:
            return time.perf_counter() - t0, c
    raise RuntimeError("no first step: " + c.logs().decode()[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="airlock:cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grace", type=int, default=60)
    a = ap.parse_args()
    client = docker.from_env(timeout=600)
    imports, firsts, stops = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        vols = {tmp: {"bind": "/app/volumes/checkpoints", "mode": "rw"}}
        import os
        os.chmod(tmp, 0o1777)
        for _ in range(a.repeats):
            imports.append(import_time(client, a.image))
            t, c = first_step(client, a.image, vols)
            firsts.append(t)
            time.sleep(3)  # a few more steps, as a real stop would find it
            t0 = time.perf_counter()
            c.stop(timeout=a.grace)
            stops.append(time.perf_counter() - t0)
            code = c.wait()["StatusCode"]
            c.remove()
            assert code == 0, f"exit {code} after docker stop"
    med = statistics.median
    print(f"import torch, transformers : median {med(imports):.2f} s  {[round(x, 2) for x in imports]}")
    print(f"start -> first train step   : median {med(firsts):.2f} s  {[round(x, 2) for x in firsts]}")
    print(f"ratio first step / import   : {med(firsts) / med(imports):.2f}x (goal <= 1.5x)")
    print(f"docker stop -> exit         : median {med(stops):.2f} s  {[round(x, 2) for x in stops]} (grace {a.grace} s)")


if __name__ == "__main__":
    main()

"""Demo: train a small torch MLP, save it as .safetensors, and analyse it with ``ww-analyze``.

    python examples/demo_cli.py [--steps 400] [--out ww-output/demo]

Runs on a CPU in well under a minute. The data is generated: inputs x ~ N(0, I) and labels from
a fixed random "teacher" network, so the student has real structure to learn.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_data(n: int, d_in: int, n_classes: int, generator):
    import torch

    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, 64), torch.nn.Tanh(),
                                  torch.nn.Linear(64, n_classes))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn(p.shape, generator=generator) * 1.5 / p.shape[-1] ** 0.5)
    x = torch.randn(n, d_in, generator=generator)
    y = teacher(x).argmax(dim=1)
    return x, y


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--out", default="ww-output/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        import torch
        from safetensors.torch import save_model
    except ImportError as exc:
        sys.exit(f"demo_cli.py needs torch and safetensors: pip install -c constraints.txt "
                 f"-e '.[all]' ({exc})")

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead on a busy CPU
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    d_in, n_classes = 32, 10
    x, y = make_data(8192, d_in, n_classes, gen)
    x_val, y_val = x[-1024:], y[-1024:]
    x, y = x[:-1024], y[:-1024]

    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, n_classes),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def accuracy() -> float:
        with torch.no_grad():
            return (model(x_val).argmax(1) == y_val).float().mean().item()

    print(f"training a {d_in}-256-256-128-{n_classes} MLP for {args.steps} steps "
          f"(validation accuracy before: {accuracy():.3f})")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    print(f"trained in {time.perf_counter() - t0:.1f} s, validation accuracy {accuracy():.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "mlp.safetensors"
    save_model(model, str(weights))
    print(f"saved {weights}\n")

    exe = shutil.which("ww-analyze")
    cmd = [exe] if exe else [sys.executable, "-m", "ww_core.cli"]
    cmd += [str(weights), "--csv", str(out / "layers.csv")]
    try:
        import matplotlib  # noqa: F401
        cmd += ["--plots", str(out / "plots")]
    except ImportError:
        pass
    print("$ ww-analyze " + " ".join(cmd[1 if exe else 3:]), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

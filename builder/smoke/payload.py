"""The smoke payload: inventory, claims check, training, and the GPU path, for torch or TensorFlow.

It ships in every image and runs on any host with a framework installed: standard library plus the
framework only, and it never imports builder. The result is JSON written to --out (not mixed into the
logs); the exit status is 0 when every check that ran passed.

    python payload.py --claims cell.json --out result.json [--gpu auto|off] [--steps N]
"""

import argparse
import importlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

SCHEMA = 1
# The loss must fall below this fraction of its first value for training to count as learning.
LOSS_FRACTION = {"mlp": 0.5, "conv": 0.8}
# GPU and CPU results of the same float32 computation must agree to within this (TF32 is switched off).
GPU_CPU_TOLERANCE = 1e-3


class Report:
    def __init__(self):
        self.checks = []

    def add(self, name, ok, detail="", **values):
        status = "pass" if ok else "fail"
        self.checks.append({"name": name, "status": status, "detail": detail, "values": values})
        print(f"[{status}] {name}: {detail}", file=sys.stderr)
        return ok

    def skip(self, name, detail):
        self.checks.append({"name": name, "status": "skip", "detail": detail, "values": {}})
        print(f"[skip] {name}: {detail}", file=sys.stderr)

    def guard(self, name, fn):
        """Run one check; an exception fails that check, not the whole payload."""
        try:
            return fn()
        except Exception as exc:  # a broken framework must be reported, not crash the run
            self.add(name, False, f"{type(exc).__name__}: {exc}")
            return None


def major_minor(version):
    return ".".join(str(version).split(".")[:2]) if version else None


def decode_cudnn(number):
    """torch reports cuDNN as one integer: 8xyz for cuDNN 8 (8902), MMmmpp for 9 and later (90100)."""
    if not number:
        return None
    number = int(number)
    if number < 10000:
        return f"{number // 1000}.{(number % 1000) // 100}.{number % 100}"
    return f"{number // 10000}.{(number % 10000) // 100}.{number % 100}"


def nvidia_wheels():
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("nvidia-", "cuda-")):
            found[name] = dist.version
    return dict(sorted(found.items()))


def cudnn_wheel(wheels):
    for name, version in wheels.items():
        if name.startswith("nvidia-cudnn"):
            return name, version
    return None, None


def pip_check():
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-2000:]


def host_driver() -> "str | None":
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        with open("/proc/driver/nvidia/version") as fh:
            for word in fh.read().split():
                if word.count(".") >= 1 and word.replace(".", "").isdigit():
                    return word
    except OSError:
        pass
    return None


def check_claims(report, claims, inv, framework):
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    report.add("claims.python", claims["python"] == py, f"claims Python {claims['python']}, runs {py}",
               claimed=claims["python"], measured=platform.python_version())
    measured_fw = (inv["framework_version"] or "").split("+")[0]
    report.add("claims.framework", claims["version"] == measured_fw,
               f"claims {framework} {claims['version']}, imports {inv['framework_version']}",
               claimed=claims["version"], measured=inv["framework_version"])
    if claims.get("cuda") is None:
        extra = "" if inv["cuda"] is None else f", but {framework} is built for CUDA {inv['cuda']}"
        report.add("claims.cpu_only", inv["cuda"] is None, "CPU-only cell" + extra, measured=inv["cuda"])
        return
    cuda = major_minor(inv["cuda"])
    report.add("claims.cuda", cuda == claims["cuda"], f"claims CUDA {claims['cuda']}, {framework} is built for "
               f"{inv['cuda'] or 'no CUDA'}", claimed=claims["cuda"], measured=inv["cuda"])
    want = major_minor(claims["cudnn"])
    got = inv["cudnn"]
    if framework == "tensorflow" and got and "." not in got:
        # TF's build info gives the major only: the minor comes from the cuDNN wheel (or the base image).
        got = inv["cudnn_wheel"] or os.environ.get("NV_CUDNN_VERSION") or got
    report.add("claims.cudnn", major_minor(got) == want,
               f"claims cuDNN {want}, {framework} loads {got or 'none'}", claimed=claims["cudnn"], measured=got)
    if inv["cudnn_wheel"]:
        report.add("claims.cudnn_wheel", inv["cudnn_wheel"] == claims["cudnn"],
                   f"claims cuDNN {claims['cudnn']}, wheel {inv['cudnn_wheel_name']} is {inv['cudnn_wheel']}",
                   claimed=claims["cudnn"], measured=inv["cudnn_wheel"])


def falls(report, name, losses, fraction):
    first, last = losses[0], losses[-1]
    return report.add(name, last < fraction * first,
                      f"loss {first:.4f} -> {last:.4f} (must fall below {fraction:.0%} of its start)",
                      first_loss=first, last_loss=last, steps=len(losses), fraction=fraction)


# ----------------------------------------------------------------------------------------------- torch
def torch_inventory(torch):
    nccl = None
    try:
        nccl = ".".join(str(p) for p in torch.cuda.nccl.version()) if torch.version.cuda else None
    except Exception:
        nccl = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gb": round(props.total_memory / 2**30, 1)})
    cudnn = None
    try:
        cudnn = decode_cudnn(torch.backends.cudnn.version())
    except Exception:
        cudnn = None
    return {"framework_version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn, "nccl": nccl,
            "gpus": gpus}


def torch_models(torch):
    nn = torch.nn
    mlp = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return mlp, conv


def torch_data(torch, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sin().sum(1, keepdim=True) + 0.5 * x[:, 4:5] ** 2)
    imgs = torch.randn(256, 1, 16, 16, generator=g)
    labels = (imgs[:, :, :8].mean((1, 2, 3)) > imgs[:, :, 8:].mean((1, 2, 3))).long()
    imgs[labels == 1, :, :8] += 0.5
    return x.to(device), y.to(device), imgs.to(device), labels.to(device)


def torch_train(torch, model, x, y, steps, loss_fn, lr=1e-2, autocast=None):
    """Train for `steps`; autocast=(device type, dtype) runs the forward pass in mixed precision."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if autocast is not None:
            with torch.autocast(autocast[0], dtype=autocast[1]):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def run_torch(report, claims, args, inv):
    torch = importlib.import_module("torch")
    inv.update(torch_inventory(torch))
    if claims:
        check_claims(report, claims, inv, "torch")
    torch.manual_seed(0)
    mlp, conv = torch_models(torch)
    x, y, imgs, labels = torch_data(torch)
    mse, xent = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    report.guard("train.cpu.mlp", lambda: falls(report, "train.cpu.mlp",
                                                  torch_train(torch, mlp, x, y, args.steps, mse), LOSS_FRACTION["mlp"]))
    report.guard("train.cpu.conv", lambda: falls(report, "train.cpu.conv", torch_train(
        torch, conv, imgs, labels, args.steps // 2, xent), LOSS_FRACTION["conv"]))
    inv["cpu_train_seconds"] = round(time.perf_counter() - t0, 2)

    def checkpoint():
        buf = io.BytesIO()
        torch.save(mlp.state_dict(), buf)
        buf.seek(0)
        fresh, _ = torch_models(torch)
        fresh.load_state_dict(torch.load(buf))
        with torch.no_grad():
            same = torch.equal(mlp(x), fresh(x))
        return report.add("checkpoint", same, "saved and reloaded model gives bit-identical outputs"
                          if same else "reloaded model's outputs differ", bytes=buf.getbuffer().nbytes)

    report.guard("checkpoint", checkpoint)
    if args.gpu == "off":
        report.skip("gpu", "GPU checks switched off (--gpu off)")
        return
    if not torch.cuda.is_available():
        report.skip("gpu", "no GPU visible to torch" + (" (CPU-only build)" if inv["cuda"] is None else ""))
        return
    report.guard("gpu.torch", lambda: torch_gpu(torch, report, args, inv))


def torch_gpu(torch, report, args, inv, device="cuda:0", world=None):
    """The GPU checks. `device` and `world` let the same code run on the CPU (gloo) in the payload's tests."""
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    name = torch.cuda.get_device_name(dev) if on_cuda else device
    report.add("gpu.visible", True, f"{len(inv['gpus'])} GPU(s): {inv['gpus'][0]['name']}", gpus=inv["gpus"])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    mlp, conv = torch_models(torch)
    x, y, imgs, _ = torch_data(torch)
    with torch.no_grad():
        cpu_out = conv(imgs)
        dev_in = imgs.to(dev)
        torch.backends.cudnn.enabled = True
        dev_out = conv.to(dev)(dev_in)
        sync()
    through_cudnn = not on_cuda or torch.backends.cudnn.is_acceptable(dev_in)
    report.add("gpu.cudnn_conv", dev_out.device.type == dev.type and through_cudnn,
               f"convolution ran on {name}" + (f" through cuDNN {inv['cudnn']}" if on_cuda else ""))
    diff = float((dev_out.cpu() - cpu_out).abs().max())
    report.add("gpu.matches_cpu", diff < GPU_CPU_TOLERANCE, f"max |GPU - CPU| = {diff:.2e} "
               f"(tolerance {GPU_CPU_TOLERANCE:.0e})", max_abs_diff=diff, tolerance=GPU_CPU_TOLERANCE)
    bf16 = torch.cuda.is_bf16_supported() if on_cuda else True
    dtype = torch.bfloat16 if bf16 else torch.float16
    mlp_dev = mlp.to(dev)
    param_device = next(mlp_dev.parameters()).device
    t0 = time.perf_counter()
    losses = torch_train(torch, mlp_dev, x.to(dev), y.to(dev), args.steps, torch.nn.MSELoss(),
                         autocast=(dev.type, dtype))
    sync()
    seconds = time.perf_counter() - t0
    falls(report, "gpu.train_mixed_precision", losses, LOSS_FRACTION["mlp"])
    report.add("gpu.no_cpu_fallback", param_device.type == dev.type, f"parameters live on {param_device}")
    inv["gpu_train_steps_per_second"] = round(args.steps / seconds, 1)
    inv["mixed_precision_dtype"] = str(dtype).replace("torch.", "")
    n = (8192 if inv["gpus"][0].get("memory_gb", 0) > 20 else 4096) if on_cuda else 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    inv["matmul_tflops"] = {"dtype": inv["mixed_precision_dtype"], "n": n, "tflops": round(tflops, 3)}
    report.add("gpu.matmul", tflops > 0, f"{n}^3 {inv['mixed_precision_dtype']} matmul: {tflops:.1f} TFLOP/s")
    world = world if world is not None else torch.cuda.device_count()
    if world >= 2:
        backend = "nccl" if on_cuda else "gloo"
        report.guard("gpu.all_reduce", lambda: torch_all_reduce(torch, report, world, backend))
    else:
        report.skip("gpu.all_reduce", "one GPU: no all-reduce to run")


def _all_reduce_worker(rank, world, port, backend, queue):
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    t = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(t)
    queue.put((rank, float(t[0])))
    dist.destroy_process_group()


def torch_all_reduce(torch, report, world, backend):
    """An all-reduce across `world` processes, one per GPU (NCCL), as a DDP step would do."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.spawn(_all_reduce_worker, args=(world, port, backend, queue), nprocs=world, join=True)
    results = [queue.get(timeout=60) for _ in range(world)]
    want = world * (world + 1) / 2
    ok = all(abs(v - want) < 1e-6 for _, v in results)
    return report.add("gpu.all_reduce", ok, f"{backend} all-reduce over {world} ranks gave "
                      f"{sorted(v for _, v in results)}, expected {want}")


# ------------------------------------------------------------------------------------------ tensorflow
def run_tensorflow(report, claims, args, inv):
    tf = importlib.import_module("tensorflow")
    info = dict(tf.sysconfig.get_build_info())
    gpus = tf.config.list_physical_devices("GPU")
    details = []
    for gpu in gpus:
        d = tf.config.experimental.get_device_details(gpu)
        cap = d.get("compute_capability")
        details.append({"name": d.get("device_name", gpu.name),
                        "capability": ".".join(map(str, cap)) if cap else None})
    inv.update({"framework_version": tf.__version__,
                "cuda": info.get("cuda_version") if info.get("is_cuda_build") else None,
                "cudnn": info.get("cudnn_version") if info.get("is_cuda_build") else None,
                "nccl": None, "gpus": details})
    if claims:
        check_claims(report, claims, inv, "tensorflow")
    np = importlib.import_module("numpy")
    keras = tf.keras
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype("float32")
    y = (np.sin(x[:, :4]).sum(1, keepdims=True) + 0.5 * x[:, 4:5] ** 2).astype("float32")
    imgs = rng.standard_normal((256, 16, 16, 1)).astype("float32")
    labels = (imgs[:, :8].mean((1, 2, 3)) > imgs[:, 8:].mean((1, 2, 3))).astype("int64")
    imgs[labels == 1, :8] += 0.5

    def mlp():
        tf.keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="tanh"),
                                 keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(1)])

    def conv():
        tf.keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])

    def fit(model, data, target, loss, epochs):
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
        return [float(v) for v in model.fit(data, target, epochs=epochs, batch_size=64, verbose=0,
                                             shuffle=False).history["loss"]]

    epochs = max(5, args.steps // 10)
    device = "/CPU:0"
    t0 = time.perf_counter()
    with tf.device(device):
        model = mlp()
        report.guard("train.cpu.mlp", lambda: falls(report, "train.cpu.mlp", fit(model, x, y, "mse", epochs),
                                                      LOSS_FRACTION["mlp"]))
        xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        report.guard("train.cpu.conv", lambda: falls(report, "train.cpu.conv", fit(conv(), imgs, labels, xent,
                                                                                     epochs), LOSS_FRACTION["conv"]))
    inv["cpu_train_seconds"] = round(time.perf_counter() - t0, 2)

    def checkpoint():
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            fresh = keras.models.load_model(path)
            same = bool(np.array_equal(model.predict(x, verbose=0), fresh.predict(x, verbose=0)))
            size = os.path.getsize(path)
        return report.add("checkpoint", same, "saved and reloaded model gives bit-identical outputs"
                          if same else "reloaded model's outputs differ", bytes=size)

    report.guard("checkpoint", checkpoint)
    if args.gpu == "off":
        report.skip("gpu", "GPU checks switched off (--gpu off)")
        return
    if not gpus:
        report.skip("gpu", "no GPU visible to TensorFlow" + (" (CPU-only build)" if inv["cuda"] is None else ""))
        return
    report.guard("gpu.tensorflow", lambda: tf_gpu(tf, keras, np, report, args, inv, x, y, imgs, mlp, conv, fit))


def tf_gpu(tf, keras, np, report, args, inv, x, y, imgs, mlp, conv, fit):
    tf.config.experimental.enable_tensor_float_32_execution(False)
    report.add("gpu.visible", True, f"{len(inv['gpus'])} GPU(s): {inv['gpus'][0]['name']}", gpus=inv["gpus"])
    with tf.device("/CPU:0"):
        model = conv()
        cpu_out = model(imgs).numpy()
    with tf.device("/GPU:0"):
        gpu_t = model(tf.constant(imgs))
    report.add("gpu.cudnn_conv", "GPU" in gpu_t.device, f"convolution ran on {gpu_t.device}")
    diff = float(np.abs(gpu_t.numpy() - cpu_out).max())
    report.add("gpu.matches_cpu", diff < GPU_CPU_TOLERANCE, f"max |GPU - CPU| = {diff:.2e} "
               f"(tolerance {GPU_CPU_TOLERANCE:.0e})", max_abs_diff=diff, tolerance=GPU_CPU_TOLERANCE)
    cap = inv["gpus"][0].get("capability") or "0.0"
    policy = "mixed_bfloat16" if float(cap) >= 8.0 else "mixed_float16"
    keras.mixed_precision.set_global_policy(policy)
    try:
        with tf.device("/GPU:0"):
            model = mlp()
            t0 = time.perf_counter()
            epochs = max(5, args.steps // 10)
            losses = fit(model, x, y, "mse", epochs)
            seconds = time.perf_counter() - t0
            var_device = model.trainable_variables[0].device
    finally:
        keras.mixed_precision.set_global_policy("float32")
    falls(report, "gpu.train_mixed_precision", losses, LOSS_FRACTION["mlp"])
    report.add("gpu.no_cpu_fallback", "GPU" in var_device, f"variables live on {var_device}")
    inv["mixed_precision_dtype"] = policy
    inv["gpu_train_steps_per_second"] = round(epochs * (len(x) // 64) / seconds, 1)
    n = 4096
    dtype = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    with tf.device("/GPU:0"):
        a = tf.random.normal((n, n), dtype=tf.float32)
        a = tf.cast(a, dtype)
        (a @ a).numpy()
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ a
        c.numpy()
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    inv["matmul_tflops"] = {"dtype": policy, "n": n, "tflops": round(tflops, 1)}
    report.add("gpu.matmul", tflops > 0, f"{n}^3 matmul: {tflops:.1f} TFLOP/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--claims", help="cell.json: what the image claims; omit to only measure")
    parser.add_argument("--framework", choices=["torch", "tensorflow"], help="default: the claims' framework")
    parser.add_argument("--out", default=os.environ.get("BUILDER_SMOKE_OUT", "/tmp/builder-smoke/result.json"))
    parser.add_argument("--gpu", choices=["auto", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--promises", action="store_true", help="also check what every image promises (promises.py)")
    args = parser.parse_args(argv)
    claims = None
    if args.claims:
        with open(args.claims) as fh:
            claims = json.load(fh)
    framework = args.framework or (claims or {}).get("framework")
    if framework not in ("torch", "tensorflow"):
        parser.error("give --claims or --framework")
    report = Report()
    if args.promises:  # promises.py ships beside this file; run first, before the framework writes to /tmp
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        report.guard("promise", lambda: importlib.import_module("promises").check(report, claims))
    wheels = nvidia_wheels()
    name, version = cudnn_wheel(wheels)
    ok, output = pip_check()
    inv = {"python": platform.python_version(), "framework": framework, "nvidia_wheels": wheels,
           "cudnn_wheel_name": name, "cudnn_wheel": version, "pip_check": {"clean": ok, "output": output},
           "driver": host_driver(), "framework_version": None, "cuda": None, "cudnn": None, "gpus": []}
    started = time.time()
    try:
        runner = run_torch if framework == "torch" else run_tensorflow
        runner(report, claims, args, inv)
    except ImportError as exc:
        report.add("import", False, f"cannot import {framework}: {exc}")
    if ok is not None:
        report.add("pip_check", ok, "pip check is clean" if ok else output.splitlines()[0] if output else "failed")
    result = {"schema": SCHEMA, "framework": framework, "claims": claims, "inventory": inv,
              "checks": report.checks, "seconds": round(time.time() - started, 2),
              "ok": all(c["status"] != "fail" for c in report.checks)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(tmp, args.out)
    print(f"smoke: {'ok' if result['ok'] else 'FAILED'}; result in {args.out}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

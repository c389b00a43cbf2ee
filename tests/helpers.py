"""Builders that several test files share: synthetic image sets, an image folder with broken files, a shard
directory read back as one table. Test files import these from here, never from each other, so a test file can
be moved, renamed or deleted without breaking another."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# The DEC/DAC method tests' blobs: K classes of SIDE x SIDE gray images, PER_CLUSTER of each.
K, SIDE, PER_CLUSTER = 4, 8, 100


def template_classes(k: int, per_class: int, shape: tuple[int, ...], *, seed: int = 0, low: float = 30,
                     high: float = 190, noise: float = 25) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated classes of uint8 images of `shape`: a random binary template per class (pixels at `low`
    or `low + high`) plus Gaussian pixel noise, shuffled. Returns (images, labels)."""
    rng = np.random.default_rng(seed)
    templates = rng.random((k, *shape)) < 0.5
    labels = np.repeat(np.arange(k), per_class)
    pixel_noise = rng.normal(0, noise, (len(labels), *shape))
    images = np.clip(low + high * templates[labels] + pixel_noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """K well-separated classes of 8x8 gray images (no channel axis), as the DEC and DAC tests use."""
    return template_classes(K, PER_CLUSTER, (SIDE, SIDE), seed=seed)


def classes_of_images(side: int, channels: int, seed: int = 0, k: int = 3,
                      per_class: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """k classes of side x side x channels images: a random binary template per class, plus noise."""
    return template_classes(k, per_class, (side, side, channels), seed=seed, low=40, high=170, noise=20)


def image_bytes(rng: np.random.Generator, fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    """A random image of `size` (w, h) encoded as `fmt` (PNG, JPEG, ...)."""
    from PIL import Image

    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_folder(root: Path, n: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """n valid images of mixed sizes/formats in nested class folders, 2 corrupt ones, and a stray text file.
    Returns (valid relative paths, corrupt relative paths)."""
    rng = np.random.default_rng(seed)
    kinds = [("PNG", "L", ".png"), ("PNG", "RGB", ".PNG"), ("JPEG", "RGB", ".jpg"), ("JPEG", "L", ".jpeg"),
             ("BMP", "RGB", ".bmp"), ("GIF", "L", ".gif")]
    valid = []
    for i in range(n):
        cls = "cat" if i % 2 == 0 else "dog"
        sub = ["", "a", "a/deep", "b"][i % 4]
        fmt, mode, ext = kinds[i % len(kinds)]
        rel = "/".join(p for p in (cls, sub, f"img{i:03d}{ext}") if p)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(rng, fmt, mode, (int(rng.integers(12, 40)), int(rng.integers(12, 40)))))
        valid.append(rel)
    good_png = image_bytes(rng, "PNG", "RGB", (32, 32))
    (root / "dog" / "broken.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "cat" / "a" / "noise.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "cat" / "notes.txt").write_text("not an image")
    return sorted(valid), sorted(["dog/broken.png", "cat/a/noise.jpg"])


def mixed_size_folder(root: Path, per_class: int = 24, seed: int = 2) -> Path:
    """Three classes of RGB PNGs (one bright colour channel each) at random sizes from 12 to 47 px a side, as a
    folder of class sub-folders under `root`/imgs. Returns that folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, name in enumerate(["red", "green", "blue"]):
        (root / "imgs" / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(12, 48)), int(rng.integers(12, 48))
            img = np.full((h, w, 3), 30, np.uint8)
            img[..., cls] = 220
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="PNG")
            (root / "imgs" / name / f"{i:02d}.png").write_bytes(buf.getvalue())
    return root / "imgs"


def shard_rows(out):
    """Every row of the shard directory (local path or URI) `out`, in manifest order, as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydc import storage
    from raydc.data.manifest import load_manifest

    m = load_manifest(out)
    return pa.concat_tables(pq.read_table(storage.open_input_file(storage.join(str(out), s.file)))
                            .replace_schema_metadata(None) for s in m.shards)


# The sweep tests' groups: GROUPS groups of SIDE_GROUPS x SIDE_GROUPS gray images, PER_GROUP of each.
GROUPS, SIDE_GROUPS, PER_GROUP = 3, 16, 60


def plan_operators(ds) -> list:
    """A Ray Dataset's logical operators from its last to its source (its plan, not executed)."""
    op, ops = ds._logical_plan.dag, []
    while op is not None:
        ops.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return ops


def three_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated groups of 16x16 gray images (horizontal stripes, vertical stripes, a disc) plus
    pixel noise: distinct structures, so no two groups are closer than the third, whatever the network."""
    side = SIDE_GROUPS
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    templates = np.stack([(yy // 2) % 2 == 0, (xx // 2) % 2 == 0,
                          (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3.2) ** 2])
    labels = np.repeat(np.arange(GROUPS), PER_GROUP)
    noise = rng.normal(0, 20, (len(labels), side, side))
    images = np.clip(30 + 190 * templates[labels] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


RAY_START_TIMEOUT = "timed out during startup"


def retry_ray_start(start, tries: int = 3, before_retry=None):
    """A CLI subprocess (`start()` returns its CompletedProcess), started again when its embedded Ray did not come
    up: Ray gives a new node's raylet a fixed 30 s, which a loaded 2-core host can miss (Ray's limit, not the
    code under test). Any other failure is returned to the test as it is. `before_retry` undoes what the failed
    start left (e.g. a run directory a first start created)."""
    p = start()
    for _ in range(tries - 1):
        if RAY_START_TIMEOUT not in (p.stderr or "") + (p.stdout or ""):
            break
        if before_retry is not None:
            before_retry()
        p = start()
    return p


# ---- runs through the CLI, on the S3 test server ------------------------------------------------------------
def cli_train(shards: str, run_dir: str, env: dict, *extra: str, resume: bool = False) -> subprocess.CompletedProcess:
    """A tiny DeepCluster run through `raydc train` in a subprocess (the object-storage and fault tests' run)."""
    sets = [f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=4", "cluster.pca_dim=8",
            "features.pca_sample=150", "train.epochs=1", "train.batch_size=50", "train.crop_scale_min=0.5",
            "train.hflip=false", "features.batch_size=100", "run.montage_per_cluster=2", "ray.num_cpus=4", *extra]
    return subprocess.run([sys.executable, "-m", "raydc.cli", "train", *[f"--set={s}" for s in sets],
                           *(["--resume"] if resume else [])], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def s3_env(s3_server, ray_local) -> dict:
    """The CLI joins the session's Ray, whose workers inherit the AWS variables (conftest's `ray_local` starts
    after the S3 server): as a user's cluster started with them."""
    return dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **s3_server.env,
                RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)


def s3_keys(s3_server, prefix: str) -> list[str]:
    """The keys under `prefix` in the test bucket, relative to it."""
    out = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
    return [o["Key"][len(prefix):] for o in out.get("Contents", [])]


def sweep_cmd(files: Path, out: Path, *extra: str) -> list[str]:
    """`raydc sweep` over k in {2, 3} on conftest's `sweep_files`, as a user types it."""
    return [sys.executable, "-m", "raydc.cli", "sweep", "--config", str(files / "base.yaml"),
            "--sweep", str(files / "k23.yaml"), "--dir", str(out), "--set", "ray.num_cpus=3", *extra]

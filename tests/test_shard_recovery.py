"""What a restarted shard reads back: the blocks it held, in the order it held them, after a load and after a
hand-over (single-actor k-means), from files that load without pickle."""
from __future__ import annotations

import numpy as np

from raydc.engine.shard_store import ShardStore


def _block(rows, d=4, label=True):
    rows = np.asarray(rows, np.int64)
    b = {"row": rows, "id": rows * 7 - 3, "feature": np.random.default_rng(int(rows[0])).random((len(rows), d),
                                                                                                 dtype=np.float32)}
    if label:
        b["label"] = rows % 3
    return b


def test_a_restarted_shard_holds_what_it_held_after_a_load_and_a_hand_over(tmp_path):
    a = ShardStore(in_ray=False, recovery_dir=str(tmp_path), index=0)
    b = ShardStore(in_ray=False, recovery_dir=str(tmp_path), index=1)
    a.load([_block(range(0, 5)), _block(range(10, 12))])
    b.load([_block(range(5, 10))])
    a.absorb([b.take()], [1])
    back = ShardStore(in_ray=False, recovery_dir=str(tmp_path), index=0)
    back._restore()
    for name in ("rows", "ids", "x", "true"):
        np.testing.assert_array_equal(getattr(back, name), getattr(a, name))
    assert back.holdings == [0, 1] and len(back.ids) == 12
    emptied = ShardStore(in_ray=False, recovery_dir=str(tmp_path), index=1)
    emptied._restore()
    assert emptied.holdings == [] and len(emptied.ids) == 0  # it handed its rows over: it holds none now
    for f in tmp_path.glob("*.npz"):  # plain arrays: loading needs no pickle
        with np.load(f, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)

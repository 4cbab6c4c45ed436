"""The Learning Percentage formulas on hand-computed values, and their use in the ranking CSV."""

import numpy as np
import pandas as pd
from _step3_helpers import dump_args, make_workspace

import process_pickle
from small2large.lp import lp1, lp1_approx, truncated_mask


def test_lp1_hand_values():
    p0 = np.array([10.0, 4.0, 2.0, 8.0, 5.0])
    p1 = np.array([6.0, 3.0, 2.0, 9.0, 5.0])
    p3 = np.array([2.0, 2.0, 2.0, 4.0, 1.0])
    # (10-6)/(10-2) = .5; (4-3)/(4-2) = .5; P0 == P3 -> 0; (8-9)/(8-4) = -.25 (forgetting); 0/(5-1) = 0
    assert lp1(p0, p1, p3).tolist() == [0.5, 0.5, 0.0, -0.25, 0.0]
    assert lp1(p0, p1, p3).dtype == np.float64


def test_lp1_approx_hand_values():
    p0 = np.array([10.0, 4.0, 2.0, 8.0])
    p1 = np.array([6.0, 3.0, 2.0, 9.0])
    assert lp1_approx(p0, p1).tolist() == [0.4, 0.25, 0.0, -0.125]


def test_lp_is_float64_even_from_float32_dumps():
    p0 = np.array([3.3], dtype=np.float32)
    p1 = np.array([1.1], dtype=np.float32)
    p3 = np.array([1.0], dtype=np.float32)
    want = (float(p0[0]) - float(p1[0])) / (float(p0[0]) - float(p3[0]))
    assert lp1(p0, p1, p3)[0] == want


def test_truncated_mask_needs_exactly_one_in_every_dump():
    p = [np.array([1.0, 1.0, 1.0, 2.0]), np.array([1.0, 1.0, 1.5, 1.0]),
         np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0 + 1e-15, 1.0, 1.0])]
    assert truncated_mask(p).tolist() == [True, False, False, False]


def test_csv_l1_column_matches_a_per_record_loop(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=150, k=4, ties=True)
    path = process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", str(tmp_path / "rk")))
    df = pd.read_csv(path)
    p0, p1, _, p3 = ws["p"]
    for i in range(150):
        a, b, d = float(p0[i]), float(p1[i]), float(p3[i])
        want = (a - b) / (a - d) if a != d else 0.0
        assert df["m_L1"][i] == want
    assert (p0 == p3).sum() >= 8  # the P0 == P3 convention really is exercised (ties + truncated records)

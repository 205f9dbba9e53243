"""Unlearning methods compared against SISA in the benchmarks (see ../shared/BENCHMARKS.md)."""

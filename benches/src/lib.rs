//! Criterion micro-benchmarks live under `benches/`; this crate has no library code.
//!
//! - `frames`: encoding and decoding the hot-path frames (`Pages`, `Demand`),
//!   and the MAC tag of a bulk frame.
//! - `bitmap`: the present bitmap (`test_and_set`, `set_range`, `next_clear_run`).
//! - `install`: `UFFDIO_COPY` vs `UFFDIO_MOVE` vs `UFFDIO_ZEROPAGE` into a real
//!   userfaultfd-registered mapping, in pages per second.
//!
//! Run them with `cargo bench -p ringfault-benches` (add `-- --quick` for a fast
//! pass); `docs/results.md` has the figures measured on the project's machine.

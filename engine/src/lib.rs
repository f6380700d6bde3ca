//! ringfault engine.

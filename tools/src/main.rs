#![forbid(unsafe_code)]
//! The `ringfault` command.
fn main() {}

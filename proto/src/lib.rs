#![forbid(unsafe_code)]
//! ringfault wire protocol.

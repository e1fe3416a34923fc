//! bigfile-ram (skeleton)

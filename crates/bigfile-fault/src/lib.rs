//! bigfile-fault (skeleton)

//! bigfile-virtmem (skeleton)

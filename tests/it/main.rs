//! Whole-stack tests: a BigFile mapped through virtmem, served by the fault
//! layer, with pages from the RAM layer. One binary, a module per scenario.

mod block_page;
mod budget;
mod call_buffer;
mod common;
mod crash;
mod file;
mod fork;
mod fork_uffd;
mod fork_worker;
mod hugetlb;
mod lifecycle;
mod misuse;
mod readahead;
mod threads;

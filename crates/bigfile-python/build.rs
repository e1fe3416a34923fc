//! Emits `Py_3_X` cfgs for the target interpreter, so version-specific
//! C-API (exception state, frame locals) is chosen at compile time.

fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}

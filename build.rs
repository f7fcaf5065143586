//! Link-time layout of the `tollgate` binary.
//!
//! With `TOLLGATE_SYMBOL_ORDER=<file>` (written by `scripts/layout.sh`), the
//! functions named in that file, one symbol per line, are placed first and
//! next to each other in the binary's code. The kernel maps a binary's code
//! in blocks of up to 64 KiB around each page the program runs, so code
//! that runs spread across the whole binary keeps most of it resident.
//! Needs a linker with `--symbol-ordering-file` (lld, which rustc uses on
//! x86_64 Linux, or mold). Without the variable the build is unchanged.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TOLLGATE_SYMBOL_ORDER");
    let Some(order) = std::env::var_os("TOLLGATE_SYMBOL_ORDER") else {
        return;
    };
    let order = std::path::PathBuf::from(order);
    println!("cargo:rerun-if-changed={}", order.display());
    println!(
        "cargo:rustc-link-arg-bin=tollgate=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names the build does not have (another build's) are skipped quietly.
    println!("cargo:rustc-link-arg-bin=tollgate=-Wl,--no-warn-symbol-ordering");
}

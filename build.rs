//! Rebuilds when the code layout of the `tollgate` binary changes.
//!
//! An optimised `tollgate` binary is linked by `link/linker.sh` (named in
//! `.cargo/config.toml`) with the functions listed in
//! `link/hot-functions.txt`, or in the file `TOLLGATE_HOT_FUNCTIONS` names,
//! placed first and together. The linker reads the list, so cargo would not
//! link again when only the list changes; these lines make it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/linker.sh");
    println!("cargo:rerun-if-changed=link/hot-functions.txt");
    println!("cargo:rerun-if-env-changed=TOLLGATE_HOT_FUNCTIONS");
    if let Some(list) = std::env::var_os("TOLLGATE_HOT_FUNCTIONS") {
        println!(
            "cargo:rerun-if-changed={}",
            std::path::Path::new(&list).display()
        );
    }
}

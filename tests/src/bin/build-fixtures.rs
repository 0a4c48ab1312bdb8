//! Builds every fixture program (both linkings) into the target directory:
//! `cargo xtask test --kernel` runs this on the host before the suite runs
//! in a VM, where compilers are far slower (see `omegi_tests::fixtures`).

fn main() {
    let built = omegi_tests::fixtures::build_all();
    println!("build-fixtures: {} executables", built.len());
}

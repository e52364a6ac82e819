//! `slate-meta`: the metadata service binary. Everything is in [`slate_meta::cli`].

fn main() -> std::process::ExitCode {
    slate_meta::cli::main()
}

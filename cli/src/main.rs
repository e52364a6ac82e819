//! `slate`: the volume client and CLI. `slate run-node ...` and
//! `slate run-meta ...` run the storage node and the metadata service from the
//! same binary, so that `slate up` needs nothing but itself.

fn main() -> std::process::ExitCode {
    slate_dataplane::alloc::keep_large_buffers_in_heap();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("run-node") => {
            slate_node::cli::main_from(std::iter::once("slate-node".into()).chain(args.into_iter().skip(2)));
            std::process::ExitCode::SUCCESS
        }
        Some("run-meta") => {
            slate_meta::cli::main_from(std::iter::once("slate-meta".into()).chain(args.into_iter().skip(2)))
        }
        _ => slate_cli::main(),
    }
}

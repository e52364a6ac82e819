//! `slate-node`: the storage node binary. Everything is in [`slate_node::cli`].

fn main() {
    slate_dataplane::alloc::keep_large_buffers_in_heap();
    slate_node::cli::main();
}

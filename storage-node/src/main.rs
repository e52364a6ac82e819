//! `slate-node`: the storage node binary. Everything is in [`slate_node::cli`].

fn main() {
    slate_node::cli::main();
}

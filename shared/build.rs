//! `sqlx::migrate!` embeds `../migrations` when this crate compiles, but cargo does not know
//! the macro read that folder: without this, a new migration is missing from an incremental
//! build until something else in `shared` changes.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}

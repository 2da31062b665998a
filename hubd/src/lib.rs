//! hubd: a local-first smart-home hub. See `ARCHITECTURE.md` beside this crate.

pub mod model;

//! What tests, benches and examples share: reference ops, tolerances, and makers of
//! synthetic pairs and models. Built only with the `testkit` feature (on for every
//! target that has dev-dependencies), so none of it ships in the binary. May import
//! anything in the crate; nothing outside tests imports it.

pub mod models;
pub mod pairs;
pub mod reference;
pub mod tolerance;
pub mod train;

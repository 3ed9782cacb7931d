//! Tokens: the secret type, token file parsers and the resolving store.

pub mod file;
pub mod store;
pub mod token;

pub use file::{ComputeAuth, Grant, TokenEntry};
pub use store::{Admission, TokenStore};
pub use token::{Secret, Token, TokenId};

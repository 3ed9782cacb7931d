//! Tokens: the secret type, token file parsers, the resolvers behind one
//! trait (files, admin store in memory or Redis, signed stateless tokens,
//! an external HTTP resolver) and the use ledger of use-limited tokens.

pub mod cidr;
pub mod doc;
pub mod file;
pub mod http;
pub mod memory;
pub mod redis;
pub mod resolver;
pub mod setup;
pub mod signed;
pub mod store;
pub mod token;
pub mod uses;

pub use file::{ComputeAuth, Grant, Limits, TokenEntry};
pub use resolver::{Resolver, Resolvers};
pub use store::{Admission, TokenStore};
pub use token::{Secret, Token, TokenId};

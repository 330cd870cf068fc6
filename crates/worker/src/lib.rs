//! What the block decoder and the token decoder share on top of the engine:
//!
//! - [`model_args`]: the flags that load a model (directory, preset, device,
//!   dtype), also used by the `blockserve` model commands;
//! - [`wire`]: context embeddings on the wire, checked on receipt;
//! - [`status`]: engine errors as gRPC statuses, one place for every mapping.

pub mod model_args;
pub mod status;
pub mod wire;

//! Model and store errors as gRPC statuses.

use blockserve_model::ModelError;
use blockserve_store::StoreError;
use tonic::Status;

pub fn from_model(e: ModelError) -> Status {
    match e {
        ModelError::Input(m) => Status::invalid_argument(m),
        ModelError::Capacity(m) => Status::resource_exhausted(m),
        other => Status::internal(other.to_string()),
    }
}

pub fn from_store(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!("session store unavailable: {m}")),
        StoreError::Corrupt(m) => Status::internal(format!("session store: {m}")),
    }
}

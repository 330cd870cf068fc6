//! Engine errors as gRPC statuses: each kind of failure maps to one code.

use blockserve_engine::EngineError;
use blockserve_model::ModelError;
use tonic::Status;

/// The status a caller gets for `e`:
/// - the engine stopped: UNAVAILABLE (the caller may go to another instance);
/// - no capacity: RESOURCE_EXHAUSTED (retry later);
/// - the model refused the input: INVALID_ARGUMENT;
/// - the model failed, or embeddings could not cross the wire: INTERNAL.
pub fn from_engine(e: EngineError) -> Status {
    match e {
        EngineError::Stopped(_) => Status::unavailable(e.to_string()),
        EngineError::Capacity(m) => Status::resource_exhausted(m),
        EngineError::Model(ModelError::Input(m)) => Status::invalid_argument(m),
        EngineError::Model(other) => Status::internal(other.to_string()),
        EngineError::Wire(m) => Status::internal(m),
    }
}

/// A model error at the engine's boundary.
pub fn from_model(e: ModelError) -> Status {
    from_engine(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn mapped(e: EngineError) -> (Code, String) {
        let st = from_engine(e);
        (st.code(), st.message().to_string())
    }

    #[test]
    fn a_stopped_engine_is_unavailable() {
        assert_eq!(mapped(EngineError::Stopped("block decoder")), (Code::Unavailable, "block decoder engine stopped".into()));
    }

    #[test]
    fn no_capacity_is_resource_exhausted() {
        assert_eq!(mapped(EngineError::Capacity("no free KV pages".into())), (Code::ResourceExhausted, "no free KV pages".into()));
        // Also when the model says so.
        assert_eq!(from_model(ModelError::Capacity("no free KV pages".into())).code(), Code::ResourceExhausted);
    }

    #[test]
    fn input_the_model_refuses_is_invalid_argument() {
        let e = EngineError::Model(ModelError::Input("prompt_ids: 3 ids is not a positive whole number of 4-token blocks".into()));
        assert_eq!(mapped(e), (Code::InvalidArgument, "prompt_ids: 3 ids is not a positive whole number of 4-token blocks".into()));
    }

    #[test]
    fn a_failing_model_is_internal() {
        let e = EngineError::Model(ModelError::Candle(candle_core::Error::Msg("device lost".into())));
        assert_eq!(mapped(e), (Code::Internal, "device lost".into()));
    }

    #[test]
    fn wire_failures_are_internal() {
        assert_eq!(mapped(EngineError::Wire("no wire format for U8".into())), (Code::Internal, "no wire format for U8".into()));
    }
}

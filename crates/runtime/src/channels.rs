//! Client channels to other instances, one per address, reused by every call
//! (tonic channels multiplex over one HTTP/2 connection).

use std::collections::HashMap;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Status;

#[derive(Default)]
pub struct Channels(tokio::sync::Mutex<HashMap<String, Channel>>);

impl Channels {
    /// The channel to `address` (`http://host:port`), connecting on first use.
    pub async fn get(&self, address: &str) -> Result<Channel, Status> {
        let mut map = self.0.lock().await;
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(address.to_string())
            .map_err(|e| Status::invalid_argument(format!("instance address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("instance {address} unreachable: {e}")))?;
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }
}

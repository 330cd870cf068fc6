//! Client channels to other instances, one per address, reused by every call
//! (tonic channels multiplex over one HTTP/2 connection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::tls::Dialer;

#[derive(Default)]
pub struct Channels {
    dialer: Arc<Dialer>,
    /// Channel per address, with the generation of the client TLS files it
    /// was made with (a rotated client certificate means a new channel).
    map: tokio::sync::Mutex<HashMap<String, (Channel, u64)>>,
}

impl Channels {
    pub fn new(dialer: Arc<Dialer>) -> Self {
        Self { dialer, map: Default::default() }
    }

    /// The channel to `address` (`http://` or `https://host:port`), connecting
    /// on first use.
    pub async fn get(&self, address: &str) -> Result<Channel, Status> {
        let generation = self.dialer.generation();
        let mut map = self.map.lock().await;
        if let Some((c, g)) = map.get(address) {
            if *g == generation {
                return Ok(c.clone());
            }
        }
        let c = self
            .dialer
            .endpoint(address)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("instance {address} unreachable: {}", crate::status::source_chain(&e))))?;
        map.insert(address.to_string(), (c.clone(), generation));
        Ok(c)
    }
}

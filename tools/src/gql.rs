//! A small GraphQL client: queries over HTTP and subscriptions over WebSocket
//! with the `graphql-transport-ws` protocol, as the app speaks them.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Runs a query with an access token; returns the whole response (`data` and `errors`).
pub async fn query(http: &reqwest::Client, url: &str, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
    let r = http.post(url).bearer_auth(token).json(&json!({"query": query, "variables": variables})).send().await?;
    Ok(r.json().await?)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An open subscription.
pub struct Subscription {
    ws: Ws,
}

impl Subscription {
    /// Connects to `ws_url` (`ws://…/graphql`), initialises with the access
    /// token and subscribes.
    pub async fn start(ws_url: &str, token: &str, query: &str, variables: Value) -> anyhow::Result<Self> {
        let mut req = ws_url.into_client_request()?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("graphql-transport-ws"));
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        ws.send(Message::text(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}).to_string()))
            .await?;
        loop {
            let m = ws.next().await.ok_or_else(|| anyhow::anyhow!("closed before connection_ack"))??;
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "connection_ack" {
                    break;
                }
            }
        }
        ws.send(Message::text(json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}}).to_string()))
            .await?;
        Ok(Self { ws })
    }

    /// The next `data` payload; `Err` on errors or when the server closes.
    pub async fn next(&mut self) -> anyhow::Result<Value> {
        loop {
            let m = self.ws.next().await.ok_or_else(|| anyhow::anyhow!("subscription closed"))??;
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("next") if v["payload"]["data"].is_null() => anyhow::bail!("subscription error: {}", v["payload"]["errors"]),
                Some("next") => return Ok(v["payload"]["data"].clone()),
                Some("ping") => self.ws.send(Message::text(json!({"type": "pong"}).to_string())).await?,
                Some("error") => anyhow::bail!("subscription error: {}", v["payload"]),
                Some("complete") => anyhow::bail!("subscription completed"),
                _ => {}
            }
        }
    }
}

//! A small GraphQL client: queries over HTTP and subscriptions over WebSocket
//! with the `graphql-transport-ws` protocol, as the app speaks them.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Runs a query with an access token; returns the whole response (`data` and `errors`).
pub async fn query(http: &reqwest::Client, url: &str, token: &str, query: &str, variables: Value) -> crate::Result<Value> {
    query_with_headers(http, url, token, query, variables, &[]).await
}

/// [`query`] with extra headers (e.g. `HomeLink-Consistency-Token`).
pub async fn query_with_headers(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    query: &str,
    variables: Value,
    headers: &[(&str, &str)],
) -> crate::Result<Value> {
    let mut req = http.post(url).bearer_auth(token).json(&json!({"query": query, "variables": variables}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Ok(req.send().await?.json().await?)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An open subscription.
pub struct Subscription {
    ws: Ws,
}

impl Subscription {
    /// Connects to `ws_url` (`ws://…/graphql`), initialises with the access
    /// token and subscribes (as id `1`).
    pub async fn start(ws_url: &str, token: &str, query: &str, variables: Value) -> crate::Result<Self> {
        let mut s = Self::connect(ws_url, token).await?;
        s.subscribe("1", query, variables).await?;
        Ok(s)
    }

    /// Connects and initialises with the access token; subscribe next.
    pub async fn connect(ws_url: &str, token: &str) -> crate::Result<Self> {
        let mut req = ws_url.into_client_request()?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("graphql-transport-ws"));
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        ws.send(Message::text(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}).to_string()))
            .await?;
        loop {
            let m = ws.next().await.ok_or_else(|| crate::Error::Protocol("closed before connection_ack".into()))??;
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "connection_ack" {
                    break;
                }
            }
        }
        Ok(Self { ws })
    }

    /// Starts one more subscription on this connection.
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) -> crate::Result<()> {
        self.ws
            .send(Message::text(json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": variables}}).to_string()))
            .await?;
        Ok(())
    }

    /// Sends a raw text frame (for tests of the server's limits).
    pub async fn send_raw(&mut self, text: String) -> crate::Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// The next protocol message of any subscription (pings answered).
    pub async fn message(&mut self) -> crate::Result<Value> {
        loop {
            let m = self.ws.next().await.ok_or_else(|| crate::Error::Protocol("connection closed".into()))??;
            let Message::Text(t) = m else {
                if let Message::Close(c) = m {
                    return Err(crate::Error::Protocol(format!("connection closed: {c:?}")));
                }
                continue;
            };
            let v: Value = serde_json::from_str(&t)?;
            if v["type"] == "ping" {
                self.ws.send(Message::text(json!({"type": "pong"}).to_string())).await?;
                continue;
            }
            return Ok(v);
        }
    }

    /// The next `data` payload; `Err` on errors or when the server closes.
    pub async fn next(&mut self) -> crate::Result<Value> {
        loop {
            let m = self.ws.next().await.ok_or_else(|| crate::Error::Protocol("subscription closed".into()))??;
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("next") if v["payload"]["data"].is_null() => {
                    return Err(crate::Error::Protocol(format!("subscription error: {}", v["payload"]["errors"])))
                }
                Some("next") => return Ok(v["payload"]["data"].clone()),
                Some("ping") => self.ws.send(Message::text(json!({"type": "pong"}).to_string())).await?,
                Some("error") => return Err(crate::Error::Protocol(format!("subscription error: {}", v["payload"]))),
                Some("complete") => return Err(crate::Error::Protocol("subscription completed".into())),
                _ => {}
            }
        }
    }
}

//! The gRPC API over the same gateway: answers, streams, errors as status
//! codes, and virtual keys, against the fake upstream.

mod common;

use berth_proto::llmproxy::v1 as pb;
use berth_proto::llmproxy::v1::llm_proxy_client::LlmProxyClient;
use common::*;
use tokio_stream::StreamExt;
use tonic::Request;

fn authed<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

fn chat_request(model: &str) -> pb::ChatCompletionRequest {
    pb::ChatCompletionRequest {
        model: model.into(),
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
            name: String::new(),
        }],
        max_tokens: Some(8),
        extra_json: r#"{"stream_options":{"include_usage":true}}"#.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn same_operations_over_grpc() {
    let (addr, seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n  - model_name: chat\n    litellm_params: {{model: openai/ok, api_base: http://{addr}/v1}}\n\
         \x20 - model_name: other\n    litellm_params: {{model: openai/ok, api_base: http://{addr}/v1}}\n\
         general_settings: {{master_key: sk-master}}\n"
    );
    let proxy = proxy(&yaml).await;
    let mut client = LlmProxyClient::connect(proxy.grpc_uri()).await.unwrap();

    let reply = client
        .chat_completion(authed(chat_request("chat"), "sk-master"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.choices[0].message.as_ref().unwrap().content,
        "echo: hi"
    );
    assert_eq!(reply.usage.unwrap().total_tokens, 8);
    let forwarded = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(forwarded["max_tokens"], 8);
    assert_eq!(forwarded["stream_options"]["include_usage"], true);

    let mut stream = client
        .chat_completion_stream(authed(chat_request("chat"), "sk-master"))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&chunk.delta_content);
        usage = usage.or(chunk.usage);
    }
    assert_eq!(text, "one two three");
    assert_eq!(usage.unwrap().completion_tokens, 5);

    let completion = client
        .completion(authed(
            pb::CompletionRequest {
                model: "chat".into(),
                prompt: "hello".into(),
                ..Default::default()
            },
            "sk-master",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completion.choices[0].text, " world");
    let embeddings = client
        .embeddings(authed(
            pb::EmbeddingsRequest {
                model: "chat".into(),
                input: vec!["a".into(), "b".into()],
            },
            "sk-master",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(embeddings.data[1].embedding, [0.5, -0.25, 1.0]);

    // Errors: the codes grpcurl users expect.
    let unauthenticated = client
        .list_models(Request::new(pb::ListModelsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    let unknown = client
        .chat_completion(authed(chat_request("nope"), "sk-master"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Virtual keys over gRPC: limited to one model, one request per minute.
    let created = client
        .create_key(authed(
            pb::CreateKeyRequest {
                alias: "grpc".into(),
                models: vec!["chat".into()],
                rpm_limit: 1,
                ..Default::default()
            },
            "sk-master",
        ))
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret;
    let models = client
        .list_models(authed(pb::ListModelsRequest {}, &secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        models
            .models
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["chat"]
    );
    let denied = client
        .chat_completion(authed(chat_request("other"), &secret))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    client
        .chat_completion(authed(chat_request("chat"), &secret))
        .await
        .unwrap();
    let limited = client
        .chat_completion(authed(chat_request("chat"), &secret))
        .await
        .unwrap_err();
    assert_eq!(limited.code(), tonic::Code::ResourceExhausted);
    assert!(limited.metadata().get("retry-after").is_some());
    let keys = client
        .list_keys(authed(pb::ListKeysRequest::default(), "sk-master"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys[0].prompt_tokens, 3);
    let id = created.key.unwrap().id;
    client
        .delete_key(authed(pb::DeleteKeyRequest { id: id.clone() }, "sk-master"))
        .await
        .unwrap();
    let gone = client
        .delete_key(authed(pb::DeleteKeyRequest { id }, "sk-master"))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    proxy.stop().await.unwrap();
}

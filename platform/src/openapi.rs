//! OpenAPI 3.1 documents of the HTTP listeners, generated from the handlers' own annotations
//! (utoipa; routes are registered through `utoipa_axum::routes!`, so a route cannot exist
//! without its documentation). [`finish`] adds what every operation of a listener shares, in
//! one place: the bearer security scheme, the answers of the authentication and rate-limiting
//! layers (401, 403, 429), of an unavailable dependency (503) and of reading a body (400, 413),
//! all problem+json, and the
//! `/healthz` and `/openapi.json` operations every listener serves. [`document_routes`] serves
//! the document.

use axum::{
    http::{header, HeaderValue},
    response::IntoResponse,
    routing::get,
    Router,
};
use utoipa::{
    openapi::{
        header::HeaderBuilder,
        path::{HttpMethod, OperationBuilder, PathItem},
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
        ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder,
        Type,
    },
    OpenApi as _,
};

use crate::http::{FieldError, Problem, PROBLEM_JSON};

#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(Problem, FieldError)))]
struct Shared;

/// A problem+json answer.
pub fn problem_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

fn retry_after(response: Response) -> Response {
    let mut response = response;
    response.headers.insert(
        "Retry-After".to_owned(),
        HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::Integer))
            .description(Some("Seconds to wait before retrying."))
            .build(),
    );
    response
}

/// Completes a listener's document: `title`, the shared schemas and security scheme, and on
/// every `/v1` operation the answers the layers give (`429` only when `rate_limited`).
pub fn finish(api: OpenApi, title: &str, rate_limited: bool) -> OpenApi {
    let mut api = api.merge_from(Shared::openapi());
    api.info = InfoBuilder::new()
        .title(title)
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Every /v1 operation needs `Authorization: Bearer <API key or JWT>`. Errors are \
             RFC 9457 problem documents whose `type` is stable.",
        ))
        .build();
    if let Some(components) = api.components.as_mut() {
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`ofk_…`, from `orderflow keys create`) or a JWT.",
                    ))
                    .build(),
            ),
        );
    }
    for (path, item) in api.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for operation in operations(item) {
            let has_body = operation.request_body.is_some();
            operation.security = Some(vec![SecurityRequirement::new(
                "bearer",
                Vec::<String>::new(),
            )]);
            let responses = &mut operation.responses.responses;
            let mut add = |status: &str, response: Response| {
                responses
                    .entry(status.to_owned())
                    .or_insert(RefOr::T(response));
            };
            add(
                "401",
                problem_response("No credentials, or credentials that did not verify."),
            );
            add(
                "403",
                problem_response("The caller's role may not do this."),
            );
            if rate_limited {
                add(
                    "429",
                    retry_after(problem_response(
                        "Over the rate limit of the client's address or principal.",
                    )),
                );
            }
            add(
                "503",
                retry_after(problem_response(
                    "A dependency (broker, database) is unavailable; retry later.",
                )),
            );
            // Every handler that takes a body reads it through the same limit.
            if has_body {
                add("400", problem_response("The body could not be read."));
                add(
                    "413",
                    problem_response("The body is larger than the listener's limit."),
                );
            }
        }
    }
    let text = |description: &str, media: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                media,
                ContentBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(
                        if media == "application/json" {
                            Type::Object
                        } else {
                            Type::String
                        },
                    )))
                    .build(),
            )
            .build()
    };
    api.paths.add_path_operation(
        "/healthz",
        vec![HttpMethod::Get],
        OperationBuilder::new()
            .operation_id(Some("healthz"))
            .summary(Some("The process is alive and serving."))
            .response("200", text("Alive.", "text/plain; charset=utf-8"))
            .build(),
    );
    api.paths.add_path_operation(
        "/openapi.json",
        vec![HttpMethod::Get],
        OperationBuilder::new()
            .operation_id(Some("openapi"))
            .summary(Some("This document."))
            .response("200", text("The OpenAPI document.", "application/json"))
            .build(),
    );
    api
}

/// The operations of a path item.
pub fn operations(
    item: &mut PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// `GET /openapi.json`, serving `api` (rendered once).
pub fn document_routes(api: &OpenApi) -> Router {
    let body = api.to_json().unwrap_or_else(|_| "{}".to_owned());
    Router::new().route(
        "/openapi.json",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            }
        }),
    )
}

//! Checks a JSON request body against the schema its type documents (utoipa's, the same one
//! `/openapi.json` serves), listing *every* mismatch — missing required fields, unknown fields,
//! wrong types, integers out of range — where deserializing would stop at the first. The
//! type's own definition stays the one place that decides the shape.

use std::collections::BTreeMap;

use serde_json::Value;
use utoipa::openapi::{
    schema::{AdditionalProperties, ArrayItems, KnownFormat, SchemaFormat, SchemaType, Type},
    RefOr, Schema,
};

use crate::http::FieldError;

/// The schema of a request type and the schemas it refers to.
pub struct Shape {
    root: RefOr<Schema>,
    components: BTreeMap<String, RefOr<Schema>>,
}

impl Shape {
    pub fn of<T: utoipa::ToSchema>() -> Self {
        let mut schemas = Vec::new();
        T::schemas(&mut schemas);
        let mut components: BTreeMap<String, RefOr<Schema>> = schemas.into_iter().collect();
        components.insert(T::name().into_owned(), T::schema());
        Self {
            root: T::schema(),
            components,
        }
    }

    /// Every mismatch between `value` and the schema, with its field path
    /// (`lines[0].quantity`; empty for the body itself).
    pub fn errors(&self, value: &Value) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.check(&self.root, value, String::new(), &mut errors, 0);
        errors
    }

    fn resolve<'a>(&'a self, schema: &'a RefOr<Schema>) -> Option<&'a Schema> {
        match schema {
            RefOr::T(schema) => Some(schema),
            RefOr::Ref(r) => {
                let name = r.ref_location.rsplit('/').next()?;
                match self.components.get(name)? {
                    RefOr::T(schema) => Some(schema),
                    RefOr::Ref(_) => None,
                }
            }
        }
    }

    fn check(
        &self,
        schema: &RefOr<Schema>,
        value: &Value,
        path: String,
        errors: &mut Vec<FieldError>,
        depth: usize,
    ) {
        let Some(schema) = self.resolve(schema) else {
            return;
        };
        if depth > 16 {
            return;
        }
        let mut push = |message: String| {
            errors.push(FieldError {
                field: path.clone(),
                message,
            })
        };
        match schema {
            Schema::Object(object) => {
                if !type_matches(&object.schema_type, value, object.format.as_ref()) {
                    push(format!("expected {}", describe(&object.schema_type)));
                    return;
                }
                let Value::Object(map) = value else {
                    return;
                };
                for name in &object.required {
                    if !map.contains_key(name) {
                        errors.push(FieldError {
                            field: join(&path, name),
                            message: "is required".to_owned(),
                        });
                    }
                }
                let closed = matches!(
                    object.additional_properties.as_deref(),
                    Some(AdditionalProperties::FreeForm(false))
                );
                for (name, field) in map {
                    match object.properties.get(name) {
                        Some(property) => {
                            self.check(property, field, join(&path, name), errors, depth + 1)
                        }
                        None if closed => errors.push(FieldError {
                            field: join(&path, name),
                            message: "is not a known field".to_owned(),
                        }),
                        None => {}
                    }
                }
            }
            Schema::Array(array) => {
                let Value::Array(items) = value else {
                    if !(value.is_null() && nullable(&array.schema_type)) {
                        push("expected an array".to_owned());
                    }
                    return;
                };
                if let ArrayItems::RefOrSchema(item) = &array.items {
                    for (i, v) in items.iter().enumerate() {
                        self.check(item, v, format!("{path}[{i}]"), errors, depth + 1);
                    }
                }
            }
            Schema::OneOf(one_of) => {
                // Option<T> of a component: null, or T.
                if value.is_null() {
                    return;
                }
                if let Some(first) = one_of
                    .items
                    .iter()
                    .find(|s| !matches!(s, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null)))
                {
                    self.check(first, value, path, errors, depth + 1);
                }
            }
            _ => {}
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn nullable(schema_type: &SchemaType) -> bool {
    matches!(schema_type, SchemaType::Array(types) if types.contains(&Type::Null))
}

fn one_type_matches(t: &Type, value: &Value, format: Option<&SchemaFormat>) -> bool {
    match t {
        Type::Object => value.is_object(),
        Type::String => value.is_string(),
        Type::Integer => match format {
            Some(SchemaFormat::KnownFormat(KnownFormat::Int32)) => {
                value.as_i64().is_some_and(|v| i32::try_from(v).is_ok())
            }
            _ => value.is_i64(),
        },
        Type::Number => value.is_number(),
        Type::Boolean => value.is_boolean(),
        Type::Array => value.is_array(),
        Type::Null => value.is_null(),
    }
}

fn type_matches(schema_type: &SchemaType, value: &Value, format: Option<&SchemaFormat>) -> bool {
    match schema_type {
        SchemaType::Type(t) => one_type_matches(t, value, format),
        SchemaType::Array(types) => types.iter().any(|t| one_type_matches(t, value, format)),
        SchemaType::AnyValue => true,
    }
}

fn describe(schema_type: &SchemaType) -> String {
    let name = |t: &Type| match t {
        Type::Object => "an object",
        Type::String => "a string",
        Type::Integer => "an integer in range",
        Type::Number => "a number",
        Type::Boolean => "true or false",
        Type::Array => "an array",
        Type::Null => "null",
    };
    match schema_type {
        SchemaType::Type(t) => name(t).to_owned(),
        SchemaType::Array(types) => types.iter().map(name).collect::<Vec<_>>().join(" or "),
        SchemaType::AnyValue => "any value".to_owned(),
    }
}

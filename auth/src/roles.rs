//! Roles and what each may do. Every route names the [`Permission`] it needs; only
//! [`Role::allows`] decides.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// What a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Shops and partners: publish orders, cancel them, follow their status.
    Producer,
    /// Services and dashboards: every query.
    Reader,
    /// Operators: everything, and API keys, review decisions, restocks.
    Admin,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `POST /v1/orders`, `/v1/orders/batch`, `/v1/orders/{id}/cancel`.
    PlaceOrders,
    /// `GET /v1/orders/{id}`: the status URL an accepted order points to.
    ReadOrderStatus,
    /// Every other query: customers' orders, inventory, analytics, the review queue.
    Query,
    /// The admin listener: keys, review decisions, restocks.
    Administer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Producer, Role::Reader, Role::Admin];

    pub fn allows(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Admin => true,
            Role::Producer => matches!(permission, PlaceOrders | ReadOrderStatus),
            Role::Reader => matches!(permission, ReadOrderStatus | Query),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "producer" => Ok(Role::Producer),
            "reader" => Ok(Role::Reader),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected producer, reader or admin"
            )),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable and unique: `key:<key id>`, `jwt:<subject>`, or `anonymous` with auth off. Rate
    /// limits and idempotency keys are per this id.
    pub id: String,
    /// For people: the key's name or the token's subject.
    pub name: String,
    pub role: Role,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_has_exactly_its_permissions() {
        use Permission::*;
        let table = [
            (Role::Producer, [true, true, false, false]),
            (Role::Reader, [false, true, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, expected) in table {
            let got = [PlaceOrders, ReadOrderStatus, Query, Administer].map(|p| role.allows(p));
            assert_eq!(got, expected, "{role}");
        }
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }
}

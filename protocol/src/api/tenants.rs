//! Tenants, principals, tokens and grants.

use serde::{Deserialize, Serialize};

/// What a principal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the cluster: every action, every tenant.
    Operator,
    /// Manages one tenant: its volumes, principals, grants, keys and audit records.
    TenantAdmin,
    /// Sees its tenant's volumes; acts on volumes through grants.
    TenantMember,
    /// A hypervisor host: attaches volumes it is granted; reports security events.
    Host,
    /// One storage node (`Principal::node`): its heartbeats and reports, nothing else.
    Node,
}

wire_names!(Role {
    Operator => "operator",
    TenantAdmin => "tenant_admin",
    TenantMember => "tenant_member",
    Host => "host",
    Node => "node",
});

/// What a grant allows on one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Attach read-write (and read-only).
    ReadWrite,
    /// Attach read-only.
    ReadOnly,
    /// Create, list and delete snapshots.
    Snapshot,
    /// Snapshot and attach read-only (to copy a snapshot out).
    Backup,
}

wire_names!(Access { ReadWrite => "read_write", ReadOnly => "read_only", Snapshot => "snapshot", Backup => "backup" });

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    /// 1-63 characters of letters, digits, '.', '_' or '-'; unique.
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenantView {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    /// Tenant key version (bumped by rotations and by shreds of its volumes).
    pub key_version: u64,
    pub key_created_ms: u64,
    pub volumes: u64,
}

/// What a delete (of a volume or a tenant) crypto-shredded.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShredReport {
    /// What was deleted, e.g. `volume:vol-7`.
    pub deleted: String,
    /// The root key epoch after the shred.
    pub root_epoch: u64,
    pub volumes_shredded: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreatePrincipalRequest {
    /// 1-63 characters of letters, digits, '.', '_', '@' or '-'; unique.
    pub name: String,
    pub role: Role,
    /// Required for tenant roles, optional for hosts, absent for operators and nodes.
    #[serde(default)]
    pub tenant: Option<u64>,
    /// The registered storage node a `node` principal speaks for (required for that role
    /// only): it may send that node's heartbeats and reports, nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Account not usable before this time (ms since the Unix epoch).
    #[serde(default)]
    pub not_before_ms: Option<u64>,
    /// Account not usable from this time on.
    #[serde(default)]
    pub not_after_ms: Option<u64>,
    /// Expiry of the first token issued with the principal.
    #[serde(default)]
    pub token_expires_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrincipalView {
    pub id: u64,
    pub name: String,
    pub role: Role,
    pub tenant: Option<u64>,
    /// The storage node a `node` principal speaks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    pub created_ms: u64,
    pub not_before_ms: Option<u64>,
    pub not_after_ms: Option<u64>,
    pub failed_auths: u32,
    pub locked_until_ms: Option<u64>,
    pub tokens: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Token expiry (ms since the Unix epoch); none: valid while the principal is.
    #[serde(default)]
    pub expires_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    pub id: u64,
    pub principal: u64,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
}

/// A newly issued token. `token` is shown once and never stored; `Debug` leaves it out.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedToken {
    pub principal: PrincipalView,
    pub token_id: u64,
    /// The bearer token, `slate_<id>_<secret>`: keep it secret.
    #[serde(default)]
    pub token: Option<String>,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("principal", &self.principal)
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateGrantRequest {
    pub principal: u64,
    pub volume: u64,
    pub access: Access,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GrantView {
    pub id: u64,
    pub principal: u64,
    pub volume: u64,
    pub access: Access,
    pub created_ms: u64,
}

//! Tenant tokens: an EdDSA (Ed25519) JWT naming one tenant, read-write or
//! read-only, with an optional expiry — the shape of Turso's database
//! tokens. Every machine verifies them with the public keys alone (no
//! store round trip); two keys at once allow rotation.
//!
//! Claims: `{"id": "<customer id>", "a": "rw"|"ro", "iat": <s>, "exp"?: <s>}`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The one tenant the token opens.
    pub id: String,
    /// `rw` or `ro`.
    pub a: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

impl Claims {
    pub fn read_only(&self) -> bool {
        self.a != "rw"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("the token expired at {0} (unix seconds): create a new one with tenantd tokens create")]
    Expired(u64),
}

/// A new key pair: `(signing key, public key)`, both base64url.
pub fn keygen() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    (
        B64.encode(key.to_bytes()),
        B64.encode(key.verifying_key().to_bytes()),
    )
}

/// The public key of a signing key (base64url), to check a pair.
pub fn public_key_of(signing_key: &str) -> Result<String, String> {
    Ok(B64.encode(parse_signing_key(signing_key)?.verifying_key().to_bytes()))
}

fn parse_signing_key(text: &str) -> Result<SigningKey, String> {
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("TENANTD_TOKEN_SIGNING_KEY is not a key from tenantd tokens keygen (32 bytes, base64url)")?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Signs `claims` with a signing key from [`keygen`].
pub fn sign(signing_key: &str, claims: &Claims) -> Result<String, String> {
    let key = parse_signing_key(signing_key)?;
    let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
    let message = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
    let signature = key.sign(message.as_bytes());
    Ok(format!("{message}.{}", B64.encode(signature.to_bytes())))
}

/// The public keys a machine accepts tokens from.
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    keys: Vec<VerifyingKey>,
}

impl TokenVerifier {
    /// Parses `TENANTD_TOKEN_PUBLIC_KEY`: one key, or several separated by
    /// commas (during a rotation).
    pub fn parse(list: &str) -> Result<TokenVerifier, String> {
        let keys = list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|text| {
                let bytes: [u8; 32] = B64
                    .decode(text)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        format!("TENANTD_TOKEN_PUBLIC_KEY: {text:?} is not a public key from tenantd tokens keygen (32 bytes, base64url)")
                    })?;
                VerifyingKey::from_bytes(&bytes)
                    .map_err(|e| format!("TENANTD_TOKEN_PUBLIC_KEY: {text:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err("TENANTD_TOKEN_PUBLIC_KEY holds no key".into());
        }
        Ok(TokenVerifier { keys })
    }

    /// Whether `text` has a token's shape (three dot-separated parts).
    pub fn looks_like_token(text: &str) -> bool {
        text.split('.').count() == 3
    }

    /// The token's claims when one of the keys signed it and it has not
    /// expired at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let invalid = |what: &str| TokenError::Invalid(format!("invalid tenant token: {what}"));
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not three dot-separated parts"));
        };
        let header: serde_json::Value = B64
            .decode(header)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or_else(|| invalid("unreadable header"))?;
        if header["alg"] != "EdDSA" {
            return Err(invalid("the algorithm is not EdDSA"));
        }
        let signature: [u8; 64] = B64
            .decode(signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| invalid("unreadable signature"))?;
        let signature = Signature::from_bytes(&signature);
        let message = &token[..header_and_payload_len(token)];
        if !self
            .keys
            .iter()
            .any(|key| key.verify(message.as_bytes(), &signature).is_ok())
        {
            return Err(invalid(
                "not signed by a key in TENANTD_TOKEN_PUBLIC_KEY (wrong key, or a key rotated out)",
            ));
        }
        let claims: Claims = B64
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or_else(|| invalid("unreadable claims"))?;
        if let Some(exp) = claims.exp
            && now >= exp
        {
            return Err(TokenError::Expired(exp));
        }
        Ok(claims)
    }
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: Option<u64>) -> Claims {
        Claims {
            id: "100".into(),
            a: "ro".into(),
            iat: 1_000,
            exp,
        }
    }

    #[test]
    fn a_token_verifies_with_either_of_two_keys_and_not_with_another() {
        let (old_secret, old_public) = keygen();
        let (new_secret, new_public) = keygen();
        let (_, other_public) = keygen();
        let both = TokenVerifier::parse(&format!("{old_public}, {new_public}")).unwrap();
        for secret in [&old_secret, &new_secret] {
            let token = sign(secret, &claims(None)).unwrap();
            assert_eq!(both.verify(&token, 2_000).unwrap(), claims(None));
            assert!(claims(None).read_only());
        }
        let token = sign(&old_secret, &claims(None)).unwrap();
        let other = TokenVerifier::parse(&other_public).unwrap();
        assert!(matches!(
            other.verify(&token, 2_000),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(public_key_of(&old_secret).unwrap(), old_public);
    }

    #[test]
    fn an_expired_or_altered_token_is_refused() {
        let (secret, public) = keygen();
        let verifier = TokenVerifier::parse(&public).unwrap();
        let token = sign(&secret, &claims(Some(1_500))).unwrap();
        assert!(verifier.verify(&token, 1_499).is_ok());
        assert_eq!(
            verifier.verify(&token, 1_500),
            Err(TokenError::Expired(1_500))
        );
        // Another tenant's id in the claims breaks the signature.
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let forged = Claims {
            id: "200".into(),
            ..claims(None)
        };
        parts[1] = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert!(matches!(
            verifier.verify(&parts.join("."), 1_000),
            Err(TokenError::Invalid(_))
        ));
        assert!(TokenVerifier::parse("nope").is_err());
    }
}

export { SecretVault, MAX_SECRETS, type SecretInfo, type SecretVaultOptions } from "./secret-vault.js";
export { loadOrCreateSecretKey, SECRET_KEY_BYTES, SECRET_KEY_FILE } from "./secret-key.js";
export { parseNewSecret, parseSecretUpdate, parseSecretName, SECRET_BOUNDS, SECRET_ID_PREFIX, type NewSecretInput, type SecretUpdateInput } from "./secret-input.js";

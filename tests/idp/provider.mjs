// A real OpenID provider (oidc-provider) for Cubby's integration tests.
//
//   node provider.mjs --cert CERT.pem --key KEY.pem [--port 0] [--audience cubby]
//
// Serves HTTPS on 127.0.0.1 with issuer https://localhost:<port>. Once it is
// listening it prints exactly one JSON line to stdout,
//   {"issuer":"https://localhost:PORT","port":PORT}
// and never writes to stdout again: all logging goes to stderr.
//
// Clients (client_credentials only; the secret may be sent with HTTP Basic
// auth or in the form body, oidc-provider takes either):
//   alice/alice-secret, bob/bob-secret, backend/backend-secret.
// Access tokens are RFC 9068 JWTs (typ at+jwt) for the audience given by
// --audience; only `backend` is granted the scope `cubby:admin`.
//
// Test control endpoints (answered before the provider sees the request):
//   POST /_test/rotate        body {"alg":"ES256"} optional (RS256, PS256, ES256,
//                             ES384, EdDSA; default RS256). New key signs from
//                             now on; older keys stay published in the JWKS.
//                             -> {"kid":"...","alg":"..."}
//   POST /_test/retire        drop every key but the newest -> {"kids":[...]}
//   GET  /_test/jwks_fetches  -> {"count":N}, requests made to /jwks so far

import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints its notices with console.info, which is stdout. Stdout
// belongs to the one JSON line the test harness reads, so send all console
// output to stderr. (Node's console methods are bound, so this is safe.)
console.log = console.info = console.debug = console.error;

const { values: args } = parseArgs({
  options: {
    cert: { type: 'string' },
    key: { type: 'string' },
    port: { type: 'string', default: '0' },
    audience: { type: 'string', default: 'cubby' },
  },
});
if (!args.cert || !args.key) {
  console.error('usage: node provider.mjs --cert CERT.pem --key KEY.pem [--port 0] [--audience cubby]');
  process.exit(2);
}

// The single resource server every access token is issued for.
const RESOURCE = 'https://cubby.test/';
const ADMIN_SCOPE = 'cubby:admin';
const JWKS_PATH = '/jwks'; // oidc-provider's default routes.jwks

const CLIENTS = [
  { client_id: 'alice', client_secret: 'alice-secret' },
  { client_id: 'bob', client_secret: 'bob-secret' },
  { client_id: 'backend', client_secret: 'backend-secret' },
].map((client) => ({
  ...client,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
}));

// Signing keys, newest first. The first one signs new access tokens; all of
// them are published at the jwks_uri.
const KEY_PARAMS = {
  RS256: ['rsa', { modulusLength: 2048 }],
  PS256: ['rsa', { modulusLength: 2048 }],
  ES256: ['ec', { namedCurve: 'P-256' }],
  ES384: ['ec', { namedCurve: 'P-384' }],
  EdDSA: ['ed25519', {}],
};

function generateSigningKey(alg) {
  const [type, options] = KEY_PARAMS[alg];
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid: `${alg}-${randomUUID()}`, use: 'sig', alg };
}

let keys = [generateSigningKey('RS256')];

// Cookies are unused by the client_credentials grant, but oidc-provider wants
// signing keys for them.
const COOKIE_KEYS = [randomBytes(32).toString('base64url')];

function buildProvider(issuer) {
  const [current] = keys;
  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks: { keys },
    cookies: { keys: COOKIE_KEYS },
    // Same as the default, minus its "you SHOULD change it" notice.
    ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 600 },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo(ctx, resource, client) {
          if (resource !== RESOURCE) {
            throw new errors.InvalidTarget(`unknown resource ${resource}`);
          }
          return {
            audience: args.audience,
            // Scopes this client may receive for the resource; requested
            // scopes outside this list are silently dropped from the token.
            scope: client.clientId === 'backend' ? ADMIN_SCOPE : '',
            accessTokenFormat: 'jwt',
            accessTokenTTL: 300,
            // Pin the kid too: after an RS256 -> RS256 rotation two keys
            // match the alg and the newest must win.
            jwt: { sign: { alg: current.alg, kid: current.kid } },
          };
        },
      },
    },
  });
  provider.on('server_error', (ctx, err) => console.error('oidc-provider server_error:', err));
  provider.on('grant.error', (ctx, err) => console.error('oidc-provider grant.error:', err.message, err.error_description ?? ''));
  return provider;
}

let jwksFetches = 0;
let handle; // the current provider's request handler, replaced on rotation
let issuer;

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

async function readJson(req) {
  let text = '';
  for await (const chunk of req) text += chunk;
  return text.trim() ? JSON.parse(text) : {};
}

// The /_test/* endpoints. Returns false for any other path.
async function control(req, res, path) {
  if (req.method === 'POST' && path === '/_test/rotate') {
    const { alg = 'RS256' } = await readJson(req);
    if (!Object.hasOwn(KEY_PARAMS, alg)) {
      sendJson(res, 400, { error: `unsupported alg ${alg}`, supported: Object.keys(KEY_PARAMS) });
      return true;
    }
    const key = generateSigningKey(alg);
    keys = [key, ...keys];
    handle = buildProvider(issuer).callback();
    console.error(`rotated: now signing with ${key.kid}; published kids ${keys.map((k) => k.kid).join(', ')}`);
    sendJson(res, 200, { kid: key.kid, alg });
  } else if (req.method === 'POST' && path === '/_test/retire') {
    keys = keys.slice(0, 1);
    handle = buildProvider(issuer).callback();
    console.error(`retired old keys: published kids ${keys[0].kid}`);
    sendJson(res, 200, { kids: keys.map((k) => k.kid) });
  } else if (req.method === 'GET' && path === '/_test/jwks_fetches') {
    sendJson(res, 200, { count: jwksFetches });
  } else {
    return false;
  }
  return true;
}

const server = createServer(
  { cert: readFileSync(args.cert), key: readFileSync(args.key) },
  async (req, res) => {
    try {
      const path = new URL(req.url, 'https://localhost').pathname;
      if (path.startsWith('/_test/') && (await control(req, res, path))) return;
      if (path === JWKS_PATH) jwksFetches += 1;
      // oidc-provider builds endpoint URLs (jwks_uri, token_endpoint, ...) from
      // the Host header. Pin it so that discovery advertises the issuer's
      // origin even to a client that connected as 127.0.0.1.
      req.headers.host = new URL(issuer).host;
      handle(req, res);
    } catch (err) {
      console.error('request failed:', err);
      if (!res.headersSent) sendJson(res, 500, { error: String(err) });
      else res.destroy();
    }
  },
);

server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `https://localhost:${port}`;
  handle = buildProvider(issuer).callback();
  // The only line ever written to stdout (a pipe write is synchronous on Linux).
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
  console.error(`test IdP listening: issuer ${issuer}, signing key ${keys[0].kid}`);
});

function shutdown(signal) {
  console.error(`${signal}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections(); // keep-alive connections would hold close() open
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

// If the test process that spawned us dies without killing us (a panic, an
// aborted run), exit instead of lingering. (process.ppid is read once at
// startup, so probe the parent's pid instead.)
const parent = process.ppid;
setInterval(() => {
  try {
    process.kill(parent, 0);
  } catch {
    shutdown('parent exited');
  }
}, 1000).unref();

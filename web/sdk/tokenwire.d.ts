// Types of the tokenwire browser SDK (tokenwire.js). Protocol v1: see the project's docs.

export const PROTOCOL: 'tokenwire.v1';
export const VERSION: string;
/** Token refreshes (closes with 4002) in a row without progress before the connection gives up. */
export const MAX_REFRESH_TRIES: number;

/**
 * What a client does after a close code (close-codes.js, generated from the gateway's catalogue):
 * reconnect and resume; refresh the token, then reconnect and resume; stay closed until the
 * application sends something; or give up.
 */
export type ClosePolicy = 'reconnect' | 'refresh_token' | 'wait_for_user' | 'give_up';

/** The policy of a close code (codes outside the catalogue: 'reconnect'). */
export function closePolicy(code: number | null | undefined): ClosePolicy;

// --- frames the gateway sends -----------------------------------------------------------

/** The gateway's input limits; a client does not send a frame over them. */
export interface HelloLimits {
  /** The largest client frame (UTF-8 bytes of its JSON) the gateway reads. */
  max_frame_bytes?: number;
  [name: string]: number | undefined;
}

export interface HelloFrame {
  type: 'hello';
  session: string;
  user: string;
  protocol: number;
  server: string;
  limits: HelloLimits;
  /** What this gateway serves of protocol v1's second part: `call`, `files`, `run`, `input`. */
  features: string[];
}

interface RequestFrameBase {
  /** The request's id (the one `chat` was sent with). */
  id: string;
  /** 1, 2, 3 … per request, without gaps. */
  seq: number;
}

export interface AcceptedFrame extends RequestFrameBase {
  type: 'accepted';
}

export interface QueuedFrame extends RequestFrameBase {
  type: 'queued';
  reason: string;
  attempt: number;
  retry_in_ms: number;
  position?: number | null;
}

export interface StartFrame extends RequestFrameBase {
  type: 'start';
  conversation_id: string | null;
  message_id: string | null;
  task_id: string | null;
}

export interface DeltaFrame extends RequestFrameBase {
  type: 'delta';
  text: string;
}

export interface ReplaceFrame extends RequestFrameBase {
  type: 'replace';
  text: string;
}

export interface EventFrame extends RequestFrameBase {
  type: 'event';
  /** Dify's event name: agent_thought, workflow_started, node_finished, message_file, … */
  event: string;
  data: Record<string, unknown>;
}

export interface ResetFrame extends RequestFrameBase {
  type: 'reset';
  reason: string;
}

export interface EndFrame extends RequestFrameBase {
  type: 'end';
  conversation_id: string | null;
  message_id: string | null;
  usage: Record<string, unknown> | null;
  retriever_resources: unknown[];
  stopped: boolean;
  /** A workflow run's outputs, status and id (null for a chat or completion). */
  outputs?: Record<string, unknown> | null;
  status?: string | null;
  workflow_run_id?: string | null;
}

/** With `id` and `seq` it closes that request; without, a client frame was refused. */
export interface ErrorFrame {
  type: 'error';
  code: string;
  message: string;
  retryable: boolean;
  id?: string;
  seq?: number;
  /** When the same frame may pass (rate_limited, too_many_connections). */
  retry_after_ms?: number;
}

export interface PongFrame {
  type: 'pong';
}

export type RequestFrame =
  | AcceptedFrame
  | QueuedFrame
  | StartFrame
  | DeltaFrame
  | ReplaceFrame
  | EventFrame
  | ResetFrame
  | EndFrame
  | (ErrorFrame & RequestFrameBase);

/** The answer to a `call`: Dify's response body (no `seq`). */
export interface ResultFrame {
  type: 'result';
  id: string;
  data: Record<string, unknown>;
}

export type ServerFrame = HelloFrame | RequestFrame | ErrorFrame | PongFrame | ResultFrame;

// --- calls (docs/protocol.md: "Calls") --------------------------------------------------

/** Every call method; another is refused with `unknown_method`. */
export type CallMethod =
  | 'apps.list'
  | 'app.info'
  | 'app.parameters'
  | 'app.meta'
  | 'app.site'
  | 'conversations.list'
  | 'conversations.rename'
  | 'conversations.delete'
  | 'conversations.variables'
  | 'conversations.set_variable'
  | 'messages.list'
  | 'messages.feedback'
  | 'messages.suggested'
  | 'text.to_audio'
  | 'runs.get';

/** Dify's query or body fields of a call (never `user`: it is the connection's), and `app`. */
export interface CallParams {
  /** A configured app's name (default: `default`). */
  app?: string;
  [field: string]: unknown;
}

export interface CallOptions {
  /** Reject with `timeout` when no answer came (default 60 000 ms). */
  timeoutMs?: number;
}

/** A page of Dify's list endpoints. */
export interface Page<T> {
  data: T[];
  has_more: boolean;
  limit: number;
}

export interface Conversation {
  id: string;
  name: string;
  inputs: Record<string, unknown>;
  status: string;
  introduction?: string;
  created_at: number;
  updated_at: number;
}

export interface HistoryMessage {
  id: string;
  conversation_id: string;
  query: string;
  answer: string;
  inputs: Record<string, unknown>;
  message_files: unknown[];
  feedback: { rating: 'like' | 'dislike' | null } | null;
  retriever_resources: unknown[];
  created_at: number;
  [field: string]: unknown;
}

/** Dify's file object (`POST /v1/files`). */
export interface UploadedFile {
  id: string;
  name: string;
  size: number;
  extension: string | null;
  mime_type: string;
  [field: string]: unknown;
}

export interface AppEntry {
  app: string;
  available: boolean;
  name?: string;
  description?: string;
  mode?: string;
  [field: string]: unknown;
}

export interface UploadOptions {
  /** A configured app's name (its upload limits apply). */
  app?: string;
  filename?: string;
}

// --- client side ------------------------------------------------------------------------

/** A file for Dify, as Dify's `files` items. */
export interface FileRef {
  type: 'image' | 'document' | 'audio' | 'video' | 'custom';
  transfer_method: 'remote_url' | 'local_file';
  url?: string;
  upload_file_id?: string;
}

export interface ChatOptions {
  /** Client-chosen request id, unique per user (default: a random UUID). */
  id?: string;
  /** Continue this Dify conversation. */
  conversationId?: string | null;
  inputs?: Record<string, unknown>;
  files?: FileRef[];
  /** Which configured Dify app to ask (gateway default when absent). */
  app?: string | null;
}

export interface RunOptions {
  id?: string;
  /** A completion app's query. */
  query?: string;
  files?: FileRef[];
  /** Which configured Dify app runs it (gateway default when absent). */
  app?: string | null;
}

/** A human-input form a run waits on (Dify's fields; never its token). */
export interface HumanInputForm {
  form_id: string;
  node_id?: string;
  node_title?: string;
  form_content?: string;
  inputs?: Record<string, unknown>[];
  actions?: { id: string; title: string; button_style?: string }[];
  expiration_time?: number;
  [field: string]: unknown;
}

export interface BackoffOptions {
  /** First delay (default 500 ms). */
  initialMs?: number;
  /** Upper bound (default 15 000 ms). */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** 0..1: a delay is uniform in [base·(1−jitter), base] (default 0.5). */
  jitter?: number;
}

/** Returns the bearer token for the next (re)connect; sent as a `bearer.<token>` subprotocol. */
export type TokenProvider = () => string | null | undefined | Promise<string | null | undefined>;

/** Just enough of the Web Storage API (sessionStorage) for resume across page reloads. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** What the SDK needs of a WebSocket (the browser's, or any compatible one). */
export interface WebSocketLike {
  readonly protocol?: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ConnectionOptions {
  /** `ws(s)://host/v1/ws` (default: the page's own host). */
  url?: string;
  /** With TOKENWIRE_AUTH=none: the `user` query parameter. */
  user?: string | null;
  /** With TOKENWIRE_AUTH=jwt: a token, or a function called before every (re)connect. */
  token?: string | TokenProvider | null;
  /** Default: `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Where unfinished requests are kept for resume after a reload (default: sessionStorage; null: nowhere). */
  storage?: StorageLike | null;
  storageKey?: string;
  backoff?: BackoffOptions;
  /** Heartbeat `ping` period (default 20 000 ms; 0 disables). */
  pingIntervalMs?: number;
  /** A socket that receives nothing this long after a ping is replaced (default 10 000 ms). */
  pongTimeoutMs?: number;
  /** A socket without `hello` this long is replaced (default 10 000 ms). */
  connectTimeoutMs?: number;
  /**
   * A socket open this long starts the reconnect backoff over even if no request made progress
   * (default 10 000 ms); a `hello` alone does not.
   */
  stableAfterMs?: number;
  /** Connect at once when stored requests were found (default true). */
  autoConnect?: boolean;
  /** Random source for jitter, in [0, 1) (tests pass a fixed one). */
  random?: () => number;
  /** What `upload()` and `audioToText()` POST with (default: `globalThis.fetch`). */
  fetch?: typeof fetch;
}

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface StateChange {
  state: ConnectionState;
  /** Reconnect attempt number (1 for the first retry). */
  attempt?: number;
  /** Wait before this attempt. */
  delayMs?: number;
  /** Close code that caused the change, when one did. */
  code?: number | null;
  reason?: string | null;
}

export type RequestStatus =
  | 'sending'
  | 'accepted'
  | 'queued'
  | 'answering'
  | 'done'
  | 'stopped'
  | 'error';

export interface QueuedInfo {
  reason: string;
  attempt: number;
  retryInMs: number;
  position: number | null;
}

export interface StartInfo {
  conversationId: string | null;
  messageId: string | null;
  taskId: string | null;
}

/** One `event` frame of a request (agent thoughts, workflow and node events, files, …). */
export interface RequestEvent {
  event: string;
  data: Record<string, unknown>;
  seq: number;
}

export class TokenwireError extends Error {
  constructor(code: string, message: string, retryable?: boolean, frame?: ErrorFrame | null);
  readonly code: string;
  readonly retryable: boolean;
  readonly frame: ErrorFrame | null;
}

type Unsubscribe = () => void;

interface RequestEvents {
  /** Every frame applied, once each, in seq order. */
  frame: RequestFrame;
  /** The running answer text, after each change. */
  text: string;
  status: RequestStatus;
  end: ChatRequest;
  error: ChatRequest;
}

export class ChatRequest implements AsyncIterable<RequestFrame> {
  readonly id: string;
  readonly query: string;
  /** The conversation: the one asked in, then the one Dify reported. */
  readonly conversationId: string | null;
  readonly inputs: Record<string, unknown>;
  readonly files: FileRef[];
  readonly app: string | null;
  /** 'chat' or 'run' (a workflow or completion app). */
  readonly kind: 'chat' | 'run';
  /** The form this run waits on, or null. */
  readonly form: HumanInputForm | null;
  /** Refused answers to its form (`not_found`, `form_expired`, `form_submitted`). */
  readonly refusals: TokenwireError[];
  /** Answer the waiting form with one of its actions (by id). */
  answer(action: string, inputs?: Record<string, unknown>): void;
  /** The answer so far, with `replace` and `reset` applied. */
  readonly text: string;
  /** The last seq applied (what a resume sends as `after`). */
  readonly lastSeq: number;
  readonly status: RequestStatus;
  readonly queued: QueuedInfo | null;
  readonly start: StartInfo | null;
  readonly events: RequestEvent[];
  readonly end: EndFrame | null;
  readonly error: TokenwireError | null;
  /** True for a request picked up from sessionStorage after a page reload. */
  readonly restored: boolean;
  readonly createdAt: number;
  readonly frames: RequestFrame[];
  /** Resolves (never rejects) with this request once it has ended or failed. */
  readonly done: Promise<ChatRequest>;
  readonly finished: boolean;
  stop(): void;
  on<K extends keyof RequestEvents>(type: K, handler: (value: RequestEvents[K]) => void): Unsubscribe;
  off<K extends keyof RequestEvents>(type: K, handler: (value: RequestEvents[K]) => void): void;
  [Symbol.asyncIterator](): AsyncIterator<RequestFrame>;
}

interface ConnectionEvents {
  state: StateChange;
  hello: HelloFrame;
  /** A connection-level `error` frame, or a local failure (token, socket, auth close). */
  error: TokenwireError;
  frame: ServerFrame;
  pong: PongFrame;
}

export class Connection {
  constructor(options?: ConnectionOptions);
  readonly url: string;
  readonly user: string | null;
  readonly state: ConnectionState;
  /** Reconnect attempts since a socket last made progress (or stayed open `stableAfterMs`). */
  readonly attempt: number;
  readonly session: string | null;
  readonly hello: HelloFrame | null;
  readonly lastClose: { code: number; reason: string } | null;
  readonly backoff: Required<BackoffOptions>;
  /** Unfinished requests by id. */
  readonly requests: ReadonlyMap<string, ChatRequest>;
  /** Requests found in sessionStorage at construction; they resume once connected. */
  readonly restored: ChatRequest[];
  /** Open (idempotent); resolves on `hello`, rejects on close() or a `give_up` close (e.g. 4001). */
  connect(): Promise<void>;
  chat(query: string, options?: ChatOptions): ChatRequest;
  /** Run a workflow or completion app: the same request object as a chat. */
  run(inputs?: Record<string, unknown>, options?: RunOptions): ChatRequest;
  /** Answer the form request `id` waits on (an `input` frame). */
  answer(id: string, formId: string, action: string, inputs?: Record<string, unknown>): void;
  /** One call to Dify's Service API as this user: Dify's body, or a TokenwireError. */
  call<T = Record<string, unknown>>(
    method: CallMethod,
    params?: CallParams,
    options?: CallOptions,
  ): Promise<T>;
  readonly conversations: {
    list(params?: CallParams & { last_id?: string; limit?: number; sort_by?: string }): Promise<Page<Conversation>>;
    rename(params: CallParams & { conversation_id: string; name?: string; auto_generate?: boolean }): Promise<Conversation>;
    delete(params: CallParams & { conversation_id: string }): Promise<{ result: string }>;
    variables(params: CallParams & { conversation_id: string }): Promise<Page<Record<string, unknown>>>;
    setVariable(params: CallParams & { conversation_id: string; variable_id: string; value: unknown }): Promise<Record<string, unknown>>;
  };
  readonly messages: {
    list(params: CallParams & { conversation_id: string; first_id?: string; limit?: number }): Promise<Page<HistoryMessage>>;
  };
  feedback(messageId: string, rating: 'like' | 'dislike' | null, options?: CallParams & { content?: string }): Promise<{ result: string }>;
  suggested(messageId: string, options?: CallParams): Promise<string[]>;
  apps(): Promise<AppEntry[]>;
  parameters(options?: CallParams): Promise<Record<string, unknown>>;
  info(options?: CallParams): Promise<Record<string, unknown>>;
  meta(options?: CallParams): Promise<Record<string, unknown>>;
  site(options?: CallParams): Promise<Record<string, unknown>>;
  textToAudio(options: CallParams & ({ message_id: string } | { text: string }) & { voice?: string }): Promise<{ mime_type: string; audio: string }>;
  runDetails(workflowRunId: string, options?: CallParams): Promise<Record<string, unknown>>;
  /** `POST /v1/files`; put the returned `id` in `chat(q, { files: [...] })`. */
  upload(file: Blob, options?: UploadOptions): Promise<UploadedFile>;
  /** `POST /v1/audio-to-text`: the transcript. */
  audioToText(file: Blob, options?: UploadOptions): Promise<string>;
  /** `http(s)://host/v1` of this connection's gateway. */
  httpBase(): string;
  stop(id: string): void;
  ping(): void;
  close(code?: number, reason?: string): void;
  /** Drop the socket as a network failure would (it reconnects and resumes). */
  dropForTesting(): void;
  clearStorage(): void;
  on<K extends keyof ConnectionEvents>(type: K, handler: (value: ConnectionEvents[K]) => void): Unsubscribe;
  off<K extends keyof ConnectionEvents>(type: K, handler: (value: ConnectionEvents[K]) => void): void;
}

export const DEFAULT_BACKOFF: Readonly<Required<BackoffOptions>>;

/** Delay before reconnect attempt `attempt` (0-based). */
export function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;

/** The wait for a server's retry hint: uniform in [hint, hint * (1 + jitter)]. */
export function hintDelay(hintMs: number, options?: BackoffOptions, random?: () => number): number;

/** `ws(s)://<host>/v1/ws` of the page. */
export function defaultUrl(location?: { protocol: string; host: string }): string;

/** `new Connection(options)`, connecting at once. */
export function connect(options?: ConnectionOptions): Connection;

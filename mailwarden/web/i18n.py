"""The console's words in English and Japanese; the language comes from Accept-Language
unless the person picked one (``?lang=``, kept in the session and a cookie)."""

from __future__ import annotations

LANGUAGES = ("en", "ja")

WORDS: dict[str, dict[str, str]] = {
    "title": {"en": "mailwarden console", "ja": "mailwarden 管理画面"},
    "login": {"en": "Log in", "ja": "ログイン"},
    "logout": {"en": "Log out", "ja": "ログアウト"},
    "account": {"en": "Account (mail address or DN)", "ja": "アカウント (メールアドレスまたは DN)"},
    "password": {"en": "Password", "ja": "パスワード"},
    "login_failed": {"en": "Wrong account or password.", "ja": "アカウントまたはパスワードが違います。"},
    "throttled": {"en": "Too many failed logins. Try again later.",
                  "ja": "ログインの失敗が多すぎます。しばらくしてから再度お試しください。"},
    "unavailable": {"en": "The directory cannot be reached now. Try again shortly.",
                    "ja": "ディレクトリに接続できません。しばらくしてから再度お試しください。"},
    "dashboard": {"en": "Dashboard", "ja": "ダッシュボード"},
    "domains": {"en": "Domains", "ja": "ドメイン"},
    "users": {"en": "Users", "ja": "ユーザー"},
    "search": {"en": "Search", "ja": "検索"},
    "explain": {"en": "Explain", "ja": "設定の確認"},
    "services": {"en": "Services", "ja": "サービス"},
    "settings": {"en": "Settings", "ja": "設定"},
    "source": {"en": "from", "ja": "設定元"},
    "on": {"en": "on", "ja": "有効"},
    "off": {"en": "off", "ja": "無効"},
    "enable": {"en": "Switch on", "ja": "有効にする"},
    "disable": {"en": "Switch off", "ja": "無効にする"},
    "inherit": {"en": "Inherit", "ja": "継承する"},
    "save": {"en": "Save", "ja": "保存"},
    "saved": {"en": "Saved.", "ja": "保存しました。"},
    "refused": {"en": "The directory refused the change:", "ja": "ディレクトリが変更を拒否しました:"},
    "aliases": {"en": "Domain aliases", "ja": "ドメインエイリアス"},
    "user_aliases": {"en": "Aliases (other addresses)", "ja": "エイリアス (別名アドレス)"},
    "notices": {"en": "Notice templates", "ja": "通知テンプレート"},
    "my_filters": {"en": "My filters", "ja": "マイフィルタ"},
    "my_forwarding": {"en": "My forwarding", "ja": "転送設定"},
    "my_vacation": {"en": "My vacation", "ja": "不在通知"},
    "my_quarantine": {"en": "My quarantine", "ja": "隔離メール"},
    "quarantine": {"en": "Quarantine", "ja": "隔離メール"},
    "release": {"en": "Release", "ja": "受け取る"},
    "delete": {"en": "Delete", "ja": "削除"},
    "released": {"en": "Released; the message is on its way.", "ja": "解放しました。メールを配送します。"},
    "deleted": {"en": "Deleted.", "ja": "削除しました。"},
    "nothing_held": {"en": "No quarantined mail.", "ja": "隔離されたメールはありません。"},
    "sender": {"en": "Sender", "ja": "差出人"},
    "recipients": {"en": "Recipients", "ja": "宛先"},
    "subject": {"en": "Subject", "ja": "件名"},
    "reason": {"en": "Reason", "ja": "理由"},
    "received": {"en": "Received", "ja": "受信日時"},
    "address": {"en": "Address", "ja": "アドレス"},
    "one_per_line": {"en": "one per line", "ja": "1 行に 1 件"},
    "node": {"en": "This node", "ja": "このノード"},
    "cluster": {"en": "Cluster", "ja": "クラスタ"},
    "rates": {"en": "Rates per verdict", "ja": "判定ごとの件数"},
    "latency": {"en": "Backend latency", "ja": "バックエンドの応答時間"},
    "forbidden": {"en": "You may not see or change this.", "ja": "この操作の権限がありません。"},
    "not_found": {"en": "Not found.", "ja": "見つかりません。"},
    "bad_request": {"en": "The form was not accepted (expired page?). Reload and try again.",
                    "ja": "フォームを受け付けられませんでした。再読み込みしてやり直してください。"},
    "role_system_admin": {"en": "system administrator", "ja": "システム管理者"},
    "role_helpdesk": {"en": "helpdesk", "ja": "ヘルプデスク"},
    "role_domain_admin": {"en": "domain administrator", "ja": "ドメイン管理者"},
    "role_end_user": {"en": "subscriber", "ja": "利用者"},
    "spam_threshold": {"en": "Spam threshold (score)", "ja": "迷惑メール判定のしきい値"},
    "spam_action": {"en": "What happens to spam", "ja": "迷惑メールの扱い"},
    "keyword_rules": {"en": "Keyword rules (SCOPE OP ACTION PATTERN)",
                      "ja": "キーワードルール (範囲 演算 動作 パターン)"},
    "sender_allowlist": {"en": "Senders always allowed", "ja": "許可する差出人"},
    "sender_blocklist": {"en": "Senders refused", "ja": "拒否する差出人"},
    "forward_addresses": {"en": "Forward to", "ja": "転送先"},
    "forward_keep_copy": {"en": "Keep a copy in the mailbox", "ja": "メールボックスにも残す"},
    "vacation_active": {"en": "Answer with the vacation text", "ja": "不在通知を送る"},
    "vacation_subject": {"en": "Subject of the reply", "ja": "返信の件名"},
    "vacation_text": {"en": "Text of the reply", "ja": "返信の本文"},
    "yes": {"en": "yes", "ja": "はい"},
    "no": {"en": "no", "ja": "いいえ"},
}


def pick_language(accept_language: str) -> str:
    """The first of LANGUAGES the browser asks for by quality (RFC 9110), else English."""
    best, best_q = "en", -1.0
    for i, item in enumerate(accept_language.split(",")[:20]):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                continue
        lang = tag.strip().lower().split("-")[0]
        # Earlier entries win ties.
        if lang in LANGUAGES and q > best_q and q > 0:
            best, best_q = lang, q - i * 1e-6
    return best


def translator(lang: str) -> dict[str, str]:
    """The words of one language (a key without a translation shows in English)."""
    return {key: words.get(lang, words["en"]) for key, words in WORDS.items()}

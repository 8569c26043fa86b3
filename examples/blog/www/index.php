<?php
// The blog's one page: the posts, newest first, read from MariaDB (the
// service "db"), and a form that adds one.
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
$db = new mysqli(getenv('DB_HOST'), getenv('DB_USER'), getenv('DB_PASSWORD'), getenv('DB_NAME'));
$db->set_charset('utf8mb4');
if ($_SERVER['REQUEST_METHOD'] === 'POST' && trim($_POST['title'] ?? '') !== '') {
    $add = $db->prepare('INSERT INTO posts (title, body) VALUES (?, ?)');
    $title = trim($_POST['title']);
    $body = trim($_POST['body'] ?? '');
    $add->bind_param('ss', $title, $body);
    $add->execute();
    header('Location: /', true, 303);
    exit;
}
$posts = $db->query('SELECT title, body, created FROM posts ORDER BY id DESC');
function h($s) { return htmlspecialchars($s, ENT_QUOTES, 'UTF-8'); }
?>
<!doctype html>
<html><head><meta charset="utf-8"><title>Blog</title></head>
<body>
<h1>Blog</h1>
<?php foreach ($posts as $post): ?>
<article>
  <h2 class="title"><?= h($post['title']) ?></h2>
  <p><?= h($post['body']) ?></p>
  <small><?= h($post['created']) ?></small>
</article>
<?php endforeach; ?>
<form method="post" action="/">
  <p><input name="title" placeholder="Title" required></p>
  <p><textarea name="body" placeholder="Text"></textarea></p>
  <p><button type="submit">Post</button></p>
</form>
</body></html>
